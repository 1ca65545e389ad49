"""Parquet inputs of ``lepton convert``: one file, several, or a directory of them, streamed.

Parquet is columnar and stored in row groups, so rows are read one row group at a time
(``ParquetFile.read_row_group``) and written ``chunk_rows`` at a time: only the selected columns
of one row group are in memory at once, and a file larger than memory converts piece by piece.
The row count is in the files' footers, so the output is written contiguous (the layout
``lepton train`` reads with plain ``pread``s).

pyarrow is an optional dependency (``pip install lepton_hpc[parquet]``): it is imported only
when a Parquet file is opened. Columns are the features, and one of them the target as for CSV
(``--target-column``, default the last; ``--no-target``); ``--columns`` chooses the features.
Only numeric and boolean columns convert: a selected string, date or nested column is an error
naming it. Nulls are an error naming the file, row and column, or NaN with ``--missing nan``.

``rows=(lo, hi)`` reads only the table's rows ``[lo, hi)`` (a shard of ``lepton convert
--shards``): the footers give each row group's row count, so only the row groups that hold those
rows are read, and the first and last of them sliced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError, LeptonError
from .sources import Options, Source, _target_index

SUFFIXES = (".parquet", ".parq", ".pq")
NEEDS_PYARROW = "reading Parquet needs pyarrow: pip install lepton_hpc[parquet]"


def _pyarrow():
    """pyarrow and pyarrow.parquet, or one clear error naming the extra that installs them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LeptonError(NEEDS_PYARROW) from None
    return pa, pq


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def parquet_files(inputs: Sequence[Path]) -> list[Path]:
    """The Parquet files of ``inputs`` in order: files as given, directories expanded to their
    ``*.parquet`` (``.parq``, ``.pq``) files in sorted path order, hidden and ``_``-prefixed
    names (Spark's ``_SUCCESS``, temporaries) skipped, as Arrow's own dataset discovery does."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and is_parquet(f)
                and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"directory '{p}' holds no Parquet files (*.parquet, *.parq, *.pq)")
            files += found
        elif p.is_file():
            if not is_parquet(p):
                raise DataError(
                    f"'{p}': several inputs must all be Parquet files (*.parquet, *.parq, *.pq)"
                )
            files.append(p)
        else:
            raise DataError(f"input file '{p}' does not exist")
    return files


def _numeric(pa, typ) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def _column_index(spec: str, names: list[str], where: str) -> int:
    """A ``--columns`` entry: a column name, or a 0-based index (negative from the end)."""
    if spec in names:
        return names.index(spec)
    try:
        index = int(spec)
    except ValueError:
        raise DataError(
            f"{where}: no column '{spec}' for --columns (its columns are "
            f"{', '.join(map(repr, names))})"
        ) from None
    if not -len(names) <= index < len(names):
        raise DataError(f"{where}: --columns {index} is outside its {len(names)} columns")
    return index % len(names)


def open_parquet(
    paths: Sequence[Path],
    opts: Options,
    label: Path | None = None,
    rows: tuple[int, int] | None = None,
) -> Source:
    """Parquet files read one after the other as one table (the same columns and types in each).

    ``label``: what the summary and the output's ``source`` attribute name (the directory given,
    or the first file). ``rows``: only the table's rows ``[lo, hi)``.
    """
    pa, pq = _pyarrow()
    metas = []  # footers only: a data set of many files holds no file open until it is read
    for p in paths:
        try:
            metas.append(pq.read_metadata(p))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"'{p}' is not a readable Parquet file ({exc})") from None
    first, where = paths[0], f"'{paths[0]}'"
    schema = metas[0].schema.to_arrow_schema()
    names = list(schema.names)
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise DataError(f"{where} has several columns named {', '.join(map(repr, dups))}")
    n_cols = len(names)
    t = None if opts.no_target else _target_index(opts.target_column, names, n_cols, where)
    if opts.columns:
        keep = [_column_index(c.strip(), names, where) for c in opts.columns.split(",")]
        if t is not None and t in keep:
            raise DataError(f"{where}: column '{names[t]}' is the target and in --columns")
        if len(set(keep)) != len(keep):
            raise DataError(f"{where}: --columns names a column twice")
    else:
        keep = [j for j in range(n_cols) if j != t]
    if not keep:
        raise DataError(f"{where} has {n_cols} column(s): no feature column besides the target")
    selected = keep + ([] if t is None else [t])
    for j in selected:
        typ = schema.field(j).type
        if not _numeric(pa, typ):
            if j == t:
                role = " (the target: choose it with --target-column, or pass --no-target)"
            else:
                role = "" if opts.columns else " (choose the features with --columns)"
            raise DataError(
                f"{where} column '{names[j]}' has type {typ}: only numeric columns convert{role}"
            )
    wanted = {names[j]: schema.field(j).type for j in selected}
    for p, meta in zip(paths[1:], metas[1:], strict=True):  # a data set: every file alike
        other = meta.schema.to_arrow_schema()
        for name, typ in wanted.items():
            i = other.get_field_index(name)
            if i < 0 or other.field(i).type != typ:
                has = "has no such column" if i < 0 else f"has type {other.field(i).type}"
                raise DataError(
                    f"'{p}' column '{name}' {has}, but in {where} it has type {typ}: the files "
                    "of one data set need the same columns"
                )
    feature_names = [names[j] for j in keep]
    read_names = feature_names + ([] if t is None else [names[t]])
    all_f32 = all(wanted[n] == pa.float32() for n in feature_names)
    x_dtype = np.dtype(np.float32 if all_f32 else np.float64)
    out_dtype = np.dtype(opts.dtype) if opts.dtype else x_dtype
    n_rows = sum(meta.num_rows for meta in metas)
    lo, hi = (0, n_rows) if rows is None else rows
    if not 0 <= lo <= hi <= n_rows:
        raise DataError(f"{where}: the table has {n_rows} rows; rows {lo}..{hi - 1} are not in it")
    # file -> [(row group, first table row of the group, its rows)]: the groups in [lo, hi)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    start = 0
    for i, meta in enumerate(metas):
        for g in range(meta.num_row_groups):
            m = meta.row_group(g).num_rows
            if start < hi and start + m > lo:
                groups.setdefault(i, []).append((g, start, m))
            start += m

    def column(arr, path: Path, row0: int, name: str, dtype: np.dtype) -> np.ndarray:
        if arr.null_count and opts.missing == "error":
            row = row0 + int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(
                f"'{path}' row {row}, column '{name}': the value is null "
                "(--missing nan reads nulls as NaN)"
            )
        target = pa.float32() if dtype == np.float32 else pa.float64()
        arr = arr.cast(target, safe=False)  # integers round as float() does for CSV cells
        if arr.null_count:
            arr = arr.fill_null(float("nan"))
        # Floats without nulls now: a view of Arrow's data buffer, copied by the caller.
        # (``to_numpy`` would import pandas where it is installed: 25 MB of heap for nothing.)
        data = arr.buffers()[1]
        return np.frombuffer(data, dtype, len(arr), arr.offset * np.dtype(dtype).itemsize)

    file_start = np.concatenate([[0], np.cumsum([meta.num_rows for meta in metas])])

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        # One row group at a time: ``iter_batches`` reads ahead over several row groups, which
        # takes more memory than the file (measured: 17 MB for a 13 MB file of 20 groups).
        for i, file_groups in groups.items():
            path = paths[i]
            row0 = 0  # the file's row of the next batch (for messages)
            f = None
            try:
                f = pq.ParquetFile(path)
                for group, g0, size in file_groups:
                    table = f.read_row_group(group, columns=read_names)
                    a, b = max(lo - g0, 0), min(hi - g0, size)  # the group's rows in [lo, hi)
                    if (a, b) != (0, size):
                        table = table.slice(a, b - a)
                    row0 = g0 + a - int(file_start[i])
                    for batch in table.to_batches(max_chunksize=chunk_rows):
                        m = batch.num_rows
                        if m == 0:
                            continue
                        X = np.empty((m, len(feature_names)), dtype=out_dtype)
                        for j, name in enumerate(feature_names):
                            X[:, j] = column(batch.column(j), path, row0, name, out_dtype)
                        y = None
                        if t is not None:
                            y_col = batch.column(len(feature_names))
                            y = column(y_col, path, row0, names[t], np.dtype(np.float64))
                        row0 += m
                        yield X, y
                    del table
            except pa.ArrowException as exc:  # a damaged page, a codec this pyarrow lacks
                raise DataError(f"'{path}' cannot be read at row {row0} ({exc})") from None
            finally:
                if f is not None:
                    f.close()

    return Source(
        label or first,
        "parquet",
        len(feature_names),
        x_dtype,
        None if t is None else (),
        chunks,
        feature_names,
        "" if t is None else f"column '{names[t]}'",
        n_rows=hi - lo,
        contiguous=True,
    )

"""What ``lepton convert`` reads: its options, the ``Source`` a format opens, and CSV tables.

A ``Source`` knows its shape and yields (X, y) row chunks in file order, so a file larger than
memory converts. CSV rows travel through the ``csv`` module; every error names the file, and the
row and column when a cell is at fault.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

DEFAULT_CHUNK_ROWS = 65_536  # as lepton_hpc.convert_cmd
MISSING = ("error", "nan")


@dataclass(slots=True)
class Options:
    """What ``lepton convert`` was asked for (see ``register_convert``)."""

    x: str = "X"
    y: str = "y"
    target_column: str | None = None  # CSV/NPY/Parquet: name or index (default: the last)
    columns: str | None = None  # Parquet: feature columns, "a,b,3" (default: all but the target)
    no_target: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    dtype: str | None = None  # features: "float32" | "float64" | None (as the source)
    delimiter: str = ","
    missing: str = "error"  # empty CSV cells: "error" or "nan"
    force: bool = False


@dataclass(slots=True)
class Source:
    """An opened input: its shape, and a generator of (X, y) row chunks in file order."""

    path: Path
    kind: str
    n_features: int
    x_dtype: np.dtype
    y_shape: tuple[int, ...] | None  # () for one target per row, (k,) for k targets, None: no y
    chunks: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray | None]]]
    columns: list[str] = field(default_factory=list)  # feature names, when the source has them
    target: str = ""
    n_rows: int | None = None  # when known before reading (NPY, NPZ, Parquet)
    contiguous: bool = False  # write contiguous data sets of n_rows rows (the direct reader's)


# ---- CSV -----------------------------------------------------------------------------------
def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _target_index(spec: str | None, names: list[str] | None, n_cols: int, where: str) -> int:
    """The 0-based column of the target: a header name, or an index (negative from the end)."""
    if spec is None:
        return n_cols - 1
    if names is not None and spec in names:
        return names.index(spec)
    try:
        index = int(spec)
    except ValueError:
        has = f"its columns are {', '.join(map(repr, names))}" if names else "it has no header"
        raise DataError(f"{where}: no column '{spec}' for --target-column ({has})") from None
    if not -n_cols <= index < n_cols:
        raise DataError(f"{where}: --target-column {index} is outside its {n_cols} columns")
    return index % n_cols


def _feature_dtype(dtype: np.dtype, where: str) -> np.dtype:
    """float32 stays float32; other real numbers become float64; anything else is an error."""
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise DataError(f"{where}: dtype {dtype} is not a real number type")
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)


def parse_cells(
    rows: list[list[str]],
    lines: list[int],
    first_row: int,
    n_cols: int,
    opts: Options,
    path,
    column: Callable[[int], str],
) -> np.ndarray:
    """CSV rows of strings as a float64 table (``--missing nan``: empty cells are NaN); a bad
    cell is a DataError naming the file, global row, line and ``column(j)``."""
    cells = [c for r in rows for c in r]
    if opts.missing == "nan":
        cells = [c if c.strip() else "nan" for c in cells]
    try:
        values = np.fromiter(map(float, cells), dtype=np.float64, count=len(cells))
    except ValueError:
        for i, r in enumerate(rows):  # slow path, only to name the bad cell
            for j, c in enumerate(r):
                if not (_is_number(c) or (opts.missing == "nan" and not c.strip())):
                    what = f"{c!r} is not a number"
                    if not c.strip():
                        what = "the cell is empty (--missing nan reads empty cells as NaN)"
                    raise DataError(
                        f"'{path}' row {first_row + i} (line {lines[i]}), {column(j)}: {what}"
                    ) from None
        raise
    return values.reshape(len(rows), n_cols)


def split_table(table: np.ndarray, target: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, target column or None) of a parsed table."""
    if target is None:
        return table, None
    features = [j for j in range(table.shape[1]) if j != target]
    return table[:, features], table[:, target].copy()


def open_csv(path: Path, opts: Options) -> Source:
    """A CSV table: a header row when its first row is not all numbers; the target one column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = next((r for r in csv.reader(fh, delimiter=opts.delimiter) if r), None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"'{path}' is not a readable CSV file ({exc})") from None
    if first is None:
        raise DataError(f"'{path}' is empty")
    header = not all(_is_number(c) for c in first)
    names = [c.strip() for c in first] if header else None
    n_cols = len(first)
    t = None if opts.no_target else _target_index(opts.target_column, names, n_cols, f"'{path}'")
    labels = names or [f"{j}" for j in range(n_cols)]
    if t is not None and n_cols < 2:
        raise DataError(f"'{path}' has {n_cols} column(s): no feature column besides the target")
    feature_cols = [j for j in range(n_cols) if j != t]

    def column(j: int) -> str:
        return f"column '{names[j]}'" if names else f"column {j}"

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=opts.delimiter)
            rows: list[list[str]] = []
            lines: list[int] = []
            first_row = 0  # data row index of rows[0]
            skip_header = header
            try:
                for cells in reader:
                    if not cells:  # blank line
                        continue
                    if skip_header:
                        skip_header = False
                        continue
                    if len(cells) != n_cols:
                        raise DataError(
                            f"'{path}' row {first_row + len(rows)} (line {reader.line_num}) has "
                            f"{len(cells)} cells, but the {'header' if header else 'first row'} "
                            f"has {n_cols}"
                        )
                    rows.append(cells)
                    lines.append(reader.line_num)
                    if len(rows) == chunk_rows:
                        yield parse(rows, lines, first_row)
                        first_row += len(rows)
                        rows, lines = [], []
            except csv.Error as exc:
                raise DataError(f"'{path}' line {reader.line_num}: {exc}") from None
            except UnicodeDecodeError as exc:
                raise DataError(f"'{path}' is not text in UTF-8 ({exc})") from None
            if rows:
                yield parse(rows, lines, first_row)

    def parse(
        rows: list[list[str]], lines: list[int], first_row: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return split_table(parse_cells(rows, lines, first_row, n_cols, opts, path, column), t)

    return Source(
        path,
        "csv",
        len(feature_cols),
        np.dtype(np.float64),
        None if t is None else (),
        chunks,
        [labels[j] for j in feature_cols],
        "" if t is None else f"column '{labels[t]}'" if names else f"column {t}",
    )

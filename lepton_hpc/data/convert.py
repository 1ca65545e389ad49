"""Bring your own data: CSV, NPY, NPZ and Parquet into HDF5, streamed so files larger than memory
convert.

Rows travel ``chunk_rows`` at a time: CSV through the ``csv`` module, NPY through a read-only
memory map, NPZ members through their (possibly compressed) zip stream. Each chunk is appended to
resizable chunked data sets (features ``X``: float32 when the source is float32, else float64;
target ``y``: float64) in a temporary file that is renamed into place only when the whole input
converted, so a bad cell at row 10 million leaves nothing under the output name. Every error
names the file, and the row and column when a cell is at fault.

Parquet (one file, several, or a directory of them; ``parquet``) knows its row count from its
footers, so its data sets are written contiguous, the layout the training reader reads with
plain ``pread``s.

The formats are serial, so rank 0 converts while the other ranks wait for its verdict. The
readers live in ``sources`` (options, the ``Source`` interface, CSV), ``npz`` (NPY, NPZ) and
``parquet``. ``convert_shards`` writes several files instead of one (``--shards N``), every rank
writing some of them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError, LeptonError
from ..log import Log
from ..safety import atomic_file, check_not_input
from .h5 import check_writable
from .npz import open_npy, open_npz
from .parquet import SUFFIXES as PARQUET_SUFFIXES
from .parquet import is_parquet, open_parquet, parquet_files
from .sources import DEFAULT_CHUNK_ROWS, MISSING, Options, Source, open_csv

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CHUNK_ROWS",
    "FORMATS",
    "MISSING",
    "PROGRESS_EVERY_S",
    "Options",
    "Source",
    "check_options",
    "convert_file",
    "describe",
    "input_files",
    "open_csv",
    "open_npy",
    "open_npz",
    "open_parquet",
    "open_source",
    "origin",
    "write_h5",
    "write_table",
]

FORMATS = (".csv", ".npy", ".npz", *PARQUET_SUFFIXES)
CHUNK_BYTES = 1 << 20  # an HDF5 chunk holds at most about 1 MiB of features (or chunk_rows rows)
PROGRESS_EVERY_S = 10.0


# ---- conversion ----------------------------------------------------------------------------
def convert_file(
    src: str | Path | Sequence[str | Path], out: str | Path, opts: Options, log: Log | None = None
) -> str:
    """Convert ``src`` into the HDF5 file ``out``; returns a one-line summary.

    ``src``: one file, or (Parquet only) several files or a directory of them, read as one table.
    """
    srcs, files, kind = input_files(src, opts)
    out = Path(out)
    for f in files:  # even with --force
        check_not_input(out, {"data": f}, "--out")
    check_writable(out, force=opts.force)
    try:
        source = open_source(srcs, files, kind, opts)
        rows = write_h5(source, out, opts, log)
    except OSError as exc:  # unreadable input, a full disk: the user's to fix, not a bug
        raise DataError(f"converting '{srcs[0]}' to '{out}': {exc}") from None
    return f"wrote {out}: {rows} rows x {describe(source, opts)} from {origin(srcs, files)}"


def input_files(
    src: str | Path | Sequence[str | Path], opts: Options
) -> tuple[list[Path], list[Path], str]:
    """(the inputs as given, the files they name, the format: csv, npy, npz or parquet), after
    checking the options, that the files exist and that their format is known."""
    srcs = [Path(p) for p in ([src] if isinstance(src, str | Path) else src)]
    check_options(opts)
    if not srcs:
        raise DataError("no input file given")
    if len(srcs) > 1 or srcs[0].is_dir() or is_parquet(srcs[0]):
        return srcs, parquet_files(srcs), "parquet"
    first = srcs[0]
    if not first.is_file():
        raise DataError(f"input file '{first}' does not exist")
    if first.suffix.lower() not in FORMATS:
        raise DataError(
            f"'{first}': unknown format '{first.suffix}' (expected .csv, .npy, .npz or .parquet)"
        )
    if opts.columns is not None:
        raise DataError(f"'{first}': --columns is for Parquet input")
    return srcs, [first], first.suffix.lower().lstrip(".")


def open_source(
    srcs: list[Path],
    files: list[Path],
    kind: str,
    opts: Options,
    rows: tuple[int, int] | None = None,
) -> Source:
    """The input of ``input_files`` opened (``rows``: only rows ``[lo, hi)``; not for CSV, whose
    row count is not known before it is read: see ``convert_shards``)."""
    if kind == "parquet":
        label = srcs[0] if len(srcs) == 1 else files[0]
        return open_parquet(files, opts, label=label, rows=rows)
    if kind == "csv":
        if rows is not None:
            raise ValueError("CSV row ranges are read by convert_shards")
        return open_csv(files[0], opts)
    return {"npy": open_npy, "npz": open_npz}[kind](files[0], opts, rows=rows)


def describe(source: Source, opts: Options) -> str:
    """ "4 features ('X', float64, target 'y' from column 'label')" for a summary line."""
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    target = f", target '{opts.y}' from {source.target}" if source.y_shape is not None else ""
    return f"{source.n_features} features ('{opts.x}', {x_dtype}{target})"


def origin(srcs: list[Path], files: list[Path]) -> str:
    """Where the rows came from, for a summary line."""
    if len(srcs) == 1 and srcs[0].is_dir():
        return f"{len(files)} files in {srcs[0]}"
    if len(files) > 1:
        return f"{len(files)} files ({files[0]} ... {files[-1]})"
    return str(files[0])


def check_options(opts: Options) -> None:
    if opts.chunk_rows < 1:
        raise LeptonError(f"--chunk-rows {opts.chunk_rows} must be >= 1")
    if not opts.x or not opts.y or opts.x == opts.y:
        raise LeptonError(f"--x '{opts.x}' and --y '{opts.y}' must be two different names")
    if len(opts.delimiter) != 1:
        raise LeptonError(f"--delimiter {opts.delimiter!r} must be one character")
    if opts.no_target and opts.target_column is not None:
        raise LeptonError("--no-target and --target-column exclude each other")


# ---- writing -------------------------------------------------------------------------------
def write_h5(source: Source, out: Path, opts: Options, log: Log | None) -> int:
    """Append every chunk of ``source`` to a temporary file, then rename it to ``out``.

    A source that knows its row count and asks for it (``contiguous``) gets fixed-size contiguous
    data sets, which ``lepton train`` reads with plain ``pread``s; the others resizable chunked
    ones.
    """
    # the temporary is removed on any error; fsynced and renamed into place on success
    with atomic_file(out) as tmp:
        return write_table(source, tmp, opts, log)


def write_table(
    source: Source,
    path: Path,
    opts: Options,
    log: Log | None,
    attrs: Mapping[str, object] | None = None,
) -> int:
    """Write every chunk of ``source`` into a new HDF5 file ``path`` (a temporary name: the
    caller renames it into place, so a shard waits until every rank's shards are complete);
    ``attrs`` are added to the file's attributes. Returns the rows written."""
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    d = source.n_features
    rows_per_chunk = max(1, min(opts.chunk_rows, CHUNK_BYTES // max(1, d * x_dtype.itemsize)))
    if source.n_rows:  # no chunk larger than the whole data set
        rows_per_chunk = min(rows_per_chunk, source.n_rows)
    fixed = source.n_rows if source.contiguous and source.n_rows else None
    if source.contiguous and not source.n_rows:
        raise DataError(f"'{source.path}' holds no data rows")

    def create(fh: h5py.File, name: str, tail: tuple[int, ...], dtype) -> h5py.Dataset:
        if fixed is not None:
            return fh.create_dataset(name, (fixed, *tail), dtype=dtype)
        return fh.create_dataset(
            name, (0, *tail), maxshape=(None, *tail), chunks=(rows_per_chunk, *tail), dtype=dtype
        )

    n = 0
    t_report = time.monotonic() + PROGRESS_EVERY_S
    with h5py.File(path, "w") as fh:
        dx = create(fh, opts.x, (d,), x_dtype)
        dy = None
        if source.y_shape is not None:
            dy = create(fh, opts.y, source.y_shape, np.float64)
        for X, y in source.chunks(opts.chunk_rows):
            m = X.shape[0]
            if fixed is not None:
                if n + m > fixed:
                    raise DataError(f"'{source.path}' changed while it was converted")
            else:
                dx.resize(n + m, axis=0)
                if dy is not None:
                    dy.resize(n + m, axis=0)
            dx[n : n + m] = X
            if dy is not None:
                dy[n : n + m] = y
            n += m
            if log is not None and time.monotonic() > t_report:
                t_report += PROGRESS_EVERY_S
                log.info(f"  {source.path}: {n:,} rows converted")
        if n == 0:
            raise DataError(f"'{source.path}' holds no data rows")
        if fixed is not None and n != fixed:
            raise DataError(f"'{source.path}' changed while it was converted")
        fh.attrs.update(
            {
                "source": str(source.path),
                "format": source.kind,
                "converter": "lepton convert",
                "columns": np.array(source.columns, dtype=h5py.string_dtype()),
                "target": source.target,
                **(attrs or {}),
            }
        )
    return n

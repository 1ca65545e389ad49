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
``parquet``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
    "open_csv",
    "open_npy",
    "open_npz",
    "open_parquet",
    "write_h5",
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
    srcs = [Path(p) for p in ([src] if isinstance(src, str | Path) else src)]
    out = Path(out)
    check_options(opts)
    if not srcs:
        raise DataError("no input file given")
    parquet = len(srcs) > 1 or srcs[0].is_dir() or is_parquet(srcs[0])
    if not parquet:
        src = srcs[0]
        if not src.is_file():
            raise DataError(f"input file '{src}' does not exist")
        kind = src.suffix.lower()
        if kind not in FORMATS:
            raise DataError(
                f"'{src}': unknown format '{src.suffix}' (expected .csv, .npy, .npz or .parquet)"
            )
        if opts.columns is not None:
            raise DataError(f"'{src}': --columns is for Parquet input")
        files = [src]
    else:
        files = parquet_files(srcs)
        src = srcs[0]
    for f in files:  # even with --force
        check_not_input(out, {"data": f}, "--out")
    check_writable(out, force=opts.force)
    try:
        if parquet:
            source = open_parquet(files, opts, label=src if len(srcs) == 1 else files[0])
        else:
            opener = {".csv": open_csv, ".npy": open_npy, ".npz": open_npz}[src.suffix.lower()]
            source = opener(src, opts)
        rows = write_h5(source, out, opts, log)
    except OSError as exc:  # unreadable input, a full disk: the user's to fix, not a bug
        raise DataError(f"converting '{src}' to '{out}': {exc}") from None
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    target = f", target '{opts.y}' from {source.target}" if source.y_shape is not None else ""
    origin = str(files[0])
    if len(srcs) == 1 and srcs[0].is_dir():
        origin = f"{len(files)} files in {srcs[0]}"
    elif len(files) > 1:
        origin = f"{len(files)} files ({files[0]} ... {files[-1]})"
    return (
        f"wrote {out}: {rows} rows x {source.n_features} features ('{opts.x}', {x_dtype}"
        f"{target}) from {origin}"
    )


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
    # the temporary is removed on any error; fsynced and renamed into place on success
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as fh:
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
            }
        )
    return n

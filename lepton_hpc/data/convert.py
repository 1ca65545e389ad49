"""Bring your own data: CSV, NPY and NPZ into chunked HDF5, streamed so files larger than memory
convert.

Rows travel ``chunk_rows`` at a time: CSV through the ``csv`` module, NPY through a read-only
memory map, NPZ members through their (possibly compressed) zip stream. Each chunk is appended to
resizable chunked data sets (features ``X``: float32 when the source is float32, else float64;
target ``y``: float64) in a temporary file that is renamed into place only when the whole input
converted, so a bad cell at row 10 million leaves nothing under the output name. Every error
names the file, and the row and column when a cell is at fault.

The formats are serial, so rank 0 converts while the other ranks wait for its verdict. The
readers live in ``sources`` (options, the ``Source`` interface, CSV) and ``npz`` (NPY, NPZ).
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError, LeptonError
from ..log import Log
from ..safety import atomic_file, check_not_input
from .h5 import check_writable
from .npz import open_npy, open_npz
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
    "write_h5",
]

FORMATS = (".csv", ".npy", ".npz")
CHUNK_BYTES = 1 << 20  # an HDF5 chunk holds at most about 1 MiB of features (or chunk_rows rows)
PROGRESS_EVERY_S = 10.0


# ---- conversion ----------------------------------------------------------------------------
def convert_file(src: str | Path, out: str | Path, opts: Options, log: Log | None = None) -> str:
    """Convert ``src`` into the HDF5 file ``out``; returns a one-line summary."""
    src, out = Path(src), Path(out)
    check_options(opts)
    if not src.is_file():
        raise DataError(f"input file '{src}' does not exist")
    kind = src.suffix.lower()
    if kind not in FORMATS:
        raise DataError(f"'{src}': unknown format '{src.suffix}' (expected .csv, .npy or .npz)")
    check_not_input(out, {"data": src}, "--out")  # even with --force
    check_writable(out, force=opts.force)
    opener = {".csv": open_csv, ".npy": open_npy, ".npz": open_npz}[kind]
    try:
        source = opener(src, opts)
        rows = write_h5(source, out, opts, log)
    except OSError as exc:  # unreadable input, a full disk: the user's to fix, not a bug
        raise DataError(f"converting '{src}' to '{out}': {exc}") from None
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    target = f", target '{opts.y}' from {source.target}" if source.y_shape is not None else ""
    return (
        f"wrote {out}: {rows} rows x {source.n_features} features ('{opts.x}', {x_dtype}"
        f"{target}) from {src}"
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
    """Append every chunk of ``source`` to a temporary file, then rename it to ``out``."""
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    d = source.n_features
    rows_per_chunk = max(1, min(opts.chunk_rows, CHUNK_BYTES // max(1, d * x_dtype.itemsize)))
    if source.n_rows:  # no chunk larger than the whole data set
        rows_per_chunk = min(rows_per_chunk, source.n_rows)
    n = 0
    t_report = time.monotonic() + PROGRESS_EVERY_S
    # the temporary is removed on any error; fsynced and renamed into place on success
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as fh:
        dx = fh.create_dataset(
            opts.x, (0, d), maxshape=(None, d), chunks=(rows_per_chunk, d), dtype=x_dtype
        )
        dy = None
        if source.y_shape is not None:
            ys = source.y_shape
            dy = fh.create_dataset(
                opts.y,
                (0, *ys),
                maxshape=(None, *ys),
                chunks=(rows_per_chunk, *ys),
                dtype=np.float64,
            )
        for X, y in source.chunks(opts.chunk_rows):
            m = X.shape[0]
            dx.resize(n + m, axis=0)
            dx[n : n + m] = X
            if dy is not None:
                dy.resize(n + m, axis=0)
                dy[n : n + m] = y
            n += m
            if log is not None and time.monotonic() > t_report:
                t_report += PROGRESS_EVERY_S
                log.info(f"  {source.path}: {n:,} rows converted")
        if n == 0:
            raise DataError(f"'{source.path}' holds no data rows")
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

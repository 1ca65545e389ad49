"""NPY and NPZ inputs of ``lepton convert``, read a chunk of rows at a time.

NPY files are read through a read-only memory map; NPZ members stored uncompressed are mapped in
place, compressed ones decompressed as one sequential stream, so neither is ever loaded whole.

``rows=(lo, hi)`` opens only rows ``[lo, hi)`` (a shard of ``lepton convert --shards``): a mapped
array is sliced, a compressed stream is decompressed and skipped up to ``lo``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import Options, Source, _feature_dtype, _target_index


def _row_range(rows: tuple[int, int] | None, n: int, where: str) -> tuple[int, int]:
    """``rows`` checked against the ``n`` rows of the input (all of them when None)."""
    if rows is None:
        return 0, n
    lo, hi = rows
    if not 0 <= lo <= hi <= n:
        raise DataError(f"{where} has {n} rows; rows {lo}..{hi - 1} are not all in it")
    return lo, hi


def _table_source(
    path: Path,
    kind: str,
    array,
    opts: Options,
    where: str,
    read: Callable[[int, int], np.ndarray],
    rows: tuple[int, int] | None = None,
) -> Source:
    """An NPY-like 2-D table (one array); the target is one of its columns unless --no-target."""
    if array.ndim != 2:
        raise DataError(f"{where} must be 2-D (rows x columns), has shape {array.shape}")
    n_all, n_cols = array.shape
    first, n = _row_range(rows, n_all, where)
    dtype = _feature_dtype(array.dtype, where)
    t = None if opts.no_target else _target_index(opts.target_column, None, n_cols, where)
    if t is not None and n_cols < 2:
        raise DataError(f"{where} has 1 column: no feature column besides the target")
    keep = [j for j in range(n_cols) if j != t]

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for lo in range(first, n, chunk_rows):
            block = read(lo, min(n, lo + chunk_rows))
            if t is None:
                yield block.astype(dtype, copy=False), None
            else:
                yield block[:, keep].astype(dtype), block[:, t].astype(np.float64)

    target = "" if t is None else f"column {t}"
    y_shape = None if t is None else ()
    return Source(path, kind, len(keep), dtype, y_shape, chunks, [], target, n_rows=n - first)


def open_npy(path: Path, opts: Options, rows: tuple[int, int] | None = None) -> Source:
    """An NPY file, read through a read-only memory map (never loaded whole); ``rows``: only
    rows ``[lo, hi)``."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"'{path}' is not a readable NPY file ({exc})") from None

    def read(lo: int, hi: int) -> np.ndarray:
        return array[lo:hi]

    return _table_source(path, "npy", array, opts, f"'{path}'", read, rows)


@dataclass(slots=True)
class _Member:
    """An NPZ member's header and a reader of its rows ``[lo, hi)``, called in ascending order."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]
    close: Callable[[], None]
    stream: bool = False  # read in order from row 0: rows before a range must be skipped

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def skip(self, lo: int, hi: int) -> None:
        """Pass rows ``[lo, hi)`` of a stream (a mapped member needs nothing)."""
        if self.stream:
            self.read(lo, hi)


def _read_header(fh, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        # Version 3 differs from 2 only in allowing UTF-8 field names, which we reject anyway.
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where} is not an NPY array ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: dtype {dtype} holds Python objects, not numbers")
    return tuple(shape), bool(fortran), dtype


def _open_member(path: Path, zf: zipfile.ZipFile, name: str) -> _Member:
    """A member read as a stream of rows (any compression), or memory-mapped when stored."""
    info = zf.getinfo(name)
    where = f"'{path}' member '{name.removesuffix('.npy')}'"
    if info.compress_type == zipfile.ZIP_STORED:  # np.savez: map the bytes in place
        with path.open("rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                raise DataError(f"{where}: damaged zip entry")
            skip = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            raw.seek(info.header_offset + 30 + skip)
            shape, fortran, dtype = _read_header(raw, where)
            offset = raw.tell()
        if int(np.prod(shape)) == 0:
            array = np.empty(shape, dtype=dtype)
        else:
            order = "F" if fortran else "C"
            array = np.memmap(path, dtype, "r", offset, shape, order)
        return _Member(shape, dtype, lambda lo, hi: array[lo:hi], lambda: None)
    stream = zf.open(name)  # np.savez_compressed: decompress sequentially, one chunk at a time
    shape, fortran, dtype = _read_header(stream, where)
    if fortran and len(shape) > 1:
        stream.close()
        raise DataError(
            f"{where} is a Fortran-ordered array in a compressed archive, which cannot be "
            "read row by row; save it C-ordered (np.ascontiguousarray) or with np.savez"
        )
    row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def read(lo: int, hi: int) -> np.ndarray:
        nbytes = (hi - lo) * row_items * dtype.itemsize
        buf = stream.read(nbytes)
        if len(buf) != nbytes:
            raise DataError(f"{where} is truncated (rows {lo}..{hi - 1} missing)")
        return np.frombuffer(buf, dtype=dtype).reshape((hi - lo, *shape[1:]))

    return _Member(shape, dtype, read, stream.close, stream=True)


def open_npz(path: Path, opts: Options, rows: tuple[int, int] | None = None) -> Source:
    """An NPZ archive: features from member ``--x``, targets from member ``--y``; ``rows``: only
    rows ``[lo, hi)`` (a compressed member is decompressed from its start and skipped to ``lo``,
    so every rank reading a shard of it pays for the rows before its own)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"'{path}' is not a readable NPZ file ({exc})") from None
    members = [n.removesuffix(".npy") for n in zf.namelist()]
    wanted = [opts.x] + ([] if opts.no_target else [opts.y])
    for name in wanted:
        if name not in members:
            zf.close()
            hint = " (or pass --no-target)" if name == opts.y else ""
            raise DataError(
                f"'{path}' has no member '{name}' (has: {', '.join(members) or 'none'}); "
                f"name the members with --x/--y{hint}"
            )
    if opts.target_column is not None:
        zf.close()
        raise DataError(f"'{path}': --target-column is for CSV and NPY; NPZ targets use --y")
    xm = _open_member(path, zf, opts.x + ".npy")
    x_where = f"'{path}' member '{opts.x}'"
    if xm.ndim != 2:
        raise DataError(f"{x_where} must be 2-D (rows x features), has shape {xm.shape}")
    n_all, d = xm.shape
    first, n = _row_range(rows, n_all, x_where)
    dtype = _feature_dtype(xm.dtype, x_where)
    ym = None
    if not opts.no_target:
        ym = _open_member(path, zf, opts.y + ".npy")
        y_where = f"'{path}' member '{opts.y}'"
        _feature_dtype(ym.dtype, y_where)
        if ym.ndim not in (1, 2) or ym.shape[0] != n_all:
            raise DataError(
                f"{y_where} has shape {ym.shape} but '{opts.x}' has {n_all} rows; "
                "targets need one row per row of features"
            )

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        try:
            for lo in range(0, first, chunk_rows):  # a stream's rows before ours: read, dropped
                hi = min(first, lo + chunk_rows)
                xm.skip(lo, hi)
                if ym is not None:
                    ym.skip(lo, hi)
            for lo in range(first, n, chunk_rows):
                hi = min(n, lo + chunk_rows)
                X = xm.read(lo, hi).astype(dtype, copy=False)
                y = None if ym is None else ym.read(lo, hi).astype(np.float64)
                yield X, y
        except (zipfile.BadZipFile, EOFError) as exc:  # a damaged compressed stream
            raise DataError(f"'{path}' is damaged ({exc})") from None
        finally:
            xm.close()
            if ym is not None:
                ym.close()
            zf.close()

    y_shape = None if ym is None else tuple(ym.shape[1:])
    target = "" if ym is None else f"member '{opts.y}'"
    return Source(path, "npz", d, dtype, y_shape, chunks, [], target, n_rows=n - first)

"""Partitioned reads: rank r of p reads only its contiguous block of rows of an HDF5 data set.

Blocks differ in size by at most one row (the remainder goes to the first ranks), so no rank
ever holds the whole data set. Metadata is checked once on rank 0 and shared, so every rank
fails together with one clear message when a file or data set is wrong.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..comm.base import CollectiveError, Communicator, agree
from ..cores import default_threads
from ..errors import DataError
from ..log import Log
from . import chunk_read, shards
from .direct_read import (
    MAP_ALIGN,
    FileMap,
    cached,
    compare_identity,
    file_identity,
    in_opened_file,
    nonfinite_rows,
    pread_rows,
)
from .h5 import collective, is_parallel, open_read


def row_block(n_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank`` among ``size``: sizes differ by at most one."""
    base, extra = divmod(n_rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


REPRODUCIBLE_BLOCK_ROWS = 1024
MIN_BLOCKS = 64
DIRECT_READ = os.environ.get("LEPTON_READ", "auto") != "hdf5"  # LEPTON_READ=hdf5: h5py only
MAP_READ = os.environ.get("LEPTON_READ", "auto") == "auto"  # LEPTON_READ=pread: no mmap views


def global_block_rows(n_rows: int) -> int:
    """Rows per global block in reproducible mode: 1024, or fewer so that a file has at least 64
    blocks (a function of the file alone, never of the rank count)."""
    return min(REPRODUCIBLE_BLOCK_ROWS, max(1, -(-n_rows // MIN_BLOCKS)))


def aligned_row_block(n_rows: int, rank: int, size: int, block_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank``: whole blocks of ``block_rows`` rows, block counts
    differing by at most one between ranks (reproducible mode's partition)."""
    first, last = row_block(-(-n_rows // block_rows), rank, size)
    return min(first * block_rows, n_rows), min(last * block_rows, n_rows)


@dataclass(frozen=True, slots=True)
class DataInfo:
    """What rank 0 learned about a file before anyone reads rows."""

    path: str
    x: str
    y: str | None
    n_rows: int
    n_features: int
    x_dtype: str
    y_shape: tuple[int, ...] | None  # as handed out: a stored (n, 1) column is (n,)
    x_offset: int | None = None  # file offset of X when it can be read directly (see _direct)
    y_offset: int | None = None  # the same for y (stored as float64)
    x_ndim: int = 2  # 1: X is stored as (n,), one feature, handed out as (n, 1)
    independent: bool = False  # a virtual data set: each rank reads alone (no mpio, see read_block)
    identity: tuple[int, int, int, int] | None = None  # (st_dev, st_ino, st_size, st_mtime_ns)
    # of the file when an offset was taken: direct reads check they read that very file
    y_dtype: str | None = None  # as stored
    shards: tuple[DataInfo, ...] = ()  # several files read as one (``path`` is then a label)
    x_chunks: chunk_read.ChunkLayout | None = None  # X chunked, its chunks readable directly
    y_chunks: chunk_read.ChunkLayout | None = None  # the same for y


@dataclass(slots=True)
class Block:
    """One rank's rows: features, targets, and where they are in the file."""

    X: np.ndarray
    y: np.ndarray | None
    info: DataInfo
    start: int  # global index of the first local row
    ids: np.ndarray | None = None  # global row ids (int64, ascending) once rows were dropped

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def rows(self) -> np.ndarray:
        """Global index of each local row: built only when asked for (32 MB per 4M rows)."""
        return row_ids(self.start, self.n, self.ids)


def row_ids(start: int, n: int, ids: np.ndarray | None) -> np.ndarray:
    """``ids``, or the contiguous rows ``start..start+n`` when there is no explicit list."""
    return np.arange(start, start + n, dtype=np.int64) if ids is None else ids


def _numeric(dset: h5py.Dataset, where: str) -> None:
    if dset.dtype.kind not in "fiub":
        raise DataError(f"{where}: dtype {dset.dtype} is not numeric")


def _dataset(fh: h5py.File, path: str, name: str) -> h5py.Dataset:
    """The data set ``name`` (a path such as ``g/h/X`` works), or a DataError saying why not."""
    try:
        obj = fh.get(name)
    except (KeyError, OSError, ValueError) as exc:  # a dangling external or soft link
        raise DataError(f"'{path}:{name}' cannot be opened ({exc})") from None
    if obj is None:
        raise DataError(
            f"'{path}' has no data set '{name}' (has: {', '.join(fh.keys()) or 'none'})"
        )
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"'{path}:{name}' is a group, not a data set")
    return obj


def inspect(path: str, x: str, y: str | None, min_rows: int = 1) -> DataInfo:
    """Check that ``path`` holds a numeric ``x`` of rows x features (1-D: one feature) and a
    ``y`` with as many rows; say how each can be read (see ``_direct``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{path}' does not exist")
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"'{path}' is not a readable HDF5 file ({exc})") from None
    with fh:
        dx = _dataset(fh, path, x)
        _numeric(dx, f"'{path}:{x}'")
        if dx.ndim not in (1, 2):
            raise DataError(
                f"'{path}:{x}' must be 2-D (rows x features) or 1-D (one feature), "
                f"has shape {dx.shape}"
            )
        n, d = (dx.shape[0], 1) if dx.ndim == 1 else dx.shape
        if n == 0 or d == 0:
            raise DataError(f"'{path}:{x}' is empty (shape {dx.shape})")
        if n < min_rows:
            raise DataError(f"'{path}:{x}' has {n} rows, fewer than the {min_rows} ranks")
        y_shape, dy = None, None
        if y is not None:
            dy = _dataset(fh, path, y)
            _numeric(dy, f"'{path}:{y}'")
            if dy.ndim not in (1, 2) or dy.shape[0] != n:
                raise DataError(
                    f"'{path}': '{y}' has shape {dy.shape} but '{x}' has {n} rows; "
                    "targets need one row per row of features"
                )
            if dy.size == 0:
                raise DataError(f"'{path}:{y}' holds no targets (shape {dy.shape})")
            # A column vector (n, 1) is one target, exactly as (n,): the rest of the toolkit
            # reads 2-D targets as several regression outputs.
            y_shape = (n,) if dy.ndim == 1 or dy.shape[1] == 1 else tuple(dy.shape)
        st = os.stat(p)
        x_off = _direct(dx, _feature_dtype(dx.dtype), st)
        y_off = _direct(dy, np.dtype(np.float64), st) if dy is not None else None
        x_chunks = chunk_read.layout(dx, _feature_dtype(dx.dtype), st) if x_off is None else None
        y_chunks = None
        if dy is not None and y_off is None:
            y_chunks = chunk_read.layout(dy, np.dtype(np.float64), st)
        independent = dx.is_virtual or (dy is not None and dy.is_virtual)
        fast = (x_off, y_off, x_chunks, y_chunks)
        identity = file_identity(st) if any(f is not None for f in fast) else None
        return DataInfo(
            str(path),
            x,
            y,
            int(n),
            int(d),
            str(dx.dtype),
            y_shape,
            x_off,
            y_off,
            dx.ndim,
            independent,
            identity,
            None if dy is None else str(dy.dtype),
            x_chunks=x_chunks,
            y_chunks=y_chunks,
        )


def _direct(dset: h5py.Dataset, want: np.dtype, st: os.stat_result) -> int | None:
    """File offset of ``dset`` when its bytes are provably one contiguous run of ``want`` in the
    opened file itself (``st``: its ``os.stat``), so that rows can be read with plain ``pread``;
    else None: read through HDF5, which is right for every layout.

    Proof means: contiguous layout (not compact, chunked or virtual), no filters, no external
    raw storage, the data set's own file is the opened one (not behind an external link), the
    stored type is exactly little-endian ``want``, and every byte lies inside the file.
    """
    if not np.little_endian or dset.dtype.str != want.newbyteorder("<").str:
        return None
    plist = dset.id.get_create_plist()
    if (
        plist.get_layout() != h5py.h5d.CONTIGUOUS
        or plist.get_nfilters() != 0
        or plist.get_external_count() != 0
    ):
        return None
    if not in_opened_file(dset, st):
        return None  # an external link: the bytes are in another file
    offset = dset.id.get_offset()
    if offset is None or offset + dset.size * dset.dtype.itemsize > st.st_size:
        return None  # not written yet, or a truncated file: HDF5 gives the error
    return int(offset)


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose first byte is on an ``align``-byte boundary (NumPy gives 16).

    Rows of 32 float32 are then exactly two cache lines, not three: the random-row gather of a
    mini-batch touches a third fewer lines.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _feature_dtype(dtype: str | np.dtype) -> np.dtype:
    """float32 and float64 (either byte order) are kept, in native order; other numeric types
    (float16, integers, bool) are read as float32."""
    dt = np.dtype(dtype)
    if dt.kind == "f" and dt.itemsize in (4, 8):
        return dt.newbyteorder("=")
    return np.dtype(np.float32)


def inspect_spec(spec, x: str, y: str | None, min_rows: int = 1, what: str = "data") -> DataInfo:
    """``inspect`` of one file, or of every shard of a glob pattern or list of files
    (``shards.resolve``), checked to agree and combined into one DataInfo whose ``shards`` are
    the files' own (see ``shards.combine``)."""
    paths = shards.resolve(spec, what)
    if len(paths) == 1:
        return inspect(paths[0], x, y, min_rows)
    infos = [inspect(p, x, y) for p in paths]
    return shards.combine(infos, shards.label(spec, paths), min_rows, _feature_dtype)


def inspect_shared(path, x: str, y: str | None, comm: Communicator) -> DataInfo:
    """``inspect_spec`` on rank 0 only (no metadata storm on a parallel file system: one glob,
    one open per file), shared by all. ``path``: a file, a glob pattern or a list of files."""
    info = agree(comm, lambda: inspect_spec(path, x, y, comm.size) if comm.is_root else None)
    return comm.bcast(info)


def rank_rows(info: DataInfo, comm: Communicator, aligned: bool) -> tuple[int, int]:
    """This rank's global rows ``[start, stop)`` (``aligned``: whole global blocks)."""
    if not aligned:
        return row_block(info.n_rows, comm.rank, comm.size)
    block_rows = global_block_rows(info.n_rows)
    n_blocks = -(-info.n_rows // block_rows)
    if n_blocks < comm.size:  # every rank computed the same numbers, so all raise together
        raise CollectiveError(
            f"'{info.path}': {info.n_rows} rows make {n_blocks} blocks of {block_rows} rows, "
            f"fewer than the {comm.size} ranks (comm.reproducible gives whole blocks to ranks)",
            DataError.exit_code,
        )
    return aligned_row_block(info.n_rows, comm.rank, comm.size, block_rows)


def read_block(
    path: str,
    x: str,
    y: str | None,
    comm: Communicator,
    log: Log,
    *,
    nonfinite: str = "error",
    aligned: bool = False,
) -> Block:
    """Read this rank's block of ``x`` (and ``y``) with collective mpio reads where available.

    ``path``: a file, a glob pattern or a list of files (shards, read as their concatenation:
    ``_read_shards``). ``aligned``: the rank's rows are whole global blocks
    (``global_block_rows``), as the reproducible mode needs.
    """
    info = inspect_shared(path, x, y, comm)
    if info.shards:
        start, stop = rank_rows(info, comm, aligned)
        return _read_shards(info, start, stop, comm, nonfinite)
    path = info.path  # the one file a pattern or list named
    if not is_parallel() and comm.size > 1:
        log.warning("h5py is not built with MPI: every rank reads its block independently")
    start, stop = rank_rows(info, comm, aligned)
    m = stop - start
    Xl = aligned_empty((m, info.n_features), _feature_dtype(info.x_dtype))
    yl, bad = None, None
    direct = DIRECT_READ and info.identity is not None
    direct = direct and _same_file_everywhere(path, info.identity, comm)
    x_direct = direct and info.x_offset is not None
    x_chunked = direct and not x_direct and info.x_chunks is not None
    if direct:  # plain preads from threads, each piece screened for NaN/Inf while in cache
        threads = _reader_threads(comm)
        if x_direct:
            bad = pread_rows(
                path, info.x_offset, start, Xl, threads, screen=True, identity=info.identity
            )
        elif x_chunked:  # chunks read, decoded and screened on the rank's threads
            bad = np.zeros(m, dtype=bool)
            lay = info.x_chunks
            agree(
                comm,
                lambda: chunk_read.read_rows(
                    path, x, lay, start, stop, Xl, threads, info.identity, bad
                ),
            )
        if y is not None and info.y_offset is not None:
            yl = np.empty((m, *(info.y_shape or ())[1:]), dtype=np.float64)
            flags = pread_rows(
                path,
                info.y_offset,
                start,
                yl.reshape(m, -1),
                threads,
                screen=True,
                flags=bad,
                identity=info.identity,
            )
            bad = flags if bad is None else bad
        elif y is not None and info.y_chunks is not None:
            yl = np.empty((m, *(info.y_shape or ())[1:]), dtype=np.float64)
            bad = np.zeros(m, dtype=bool) if bad is None else bad
            lay, out = info.y_chunks, yl.reshape(m, -1)
            agree(
                comm,
                lambda: chunk_read.read_rows(
                    path, y, lay, start, stop, out, threads, info.identity, bad
                ),
            )
    if not (x_direct or x_chunked) or (y is not None and yl is None):
        what = x
        try:
            with _open(path, info, comm) as fh:
                if not (x_direct or x_chunked):
                    dx = fh[x]
                    dest = Xl if info.x_ndim == 2 else Xl.reshape(m)  # 1-D X: one feature
                    with collective(dx):  # every rank takes part; each block has >= 1 row
                        dx.read_direct(dest, np.s_[start:stop], np.s_[:])
                    if bad is not None:  # y was screened as it was read: X joins its flags
                        nonfinite_rows(Xl, out=bad)
                if y is not None and yl is None:
                    what = y  # bool targets read as 0.0 / 1.0; a column (n, 1) as (n,)
                    yl = np.asarray(fh[y][start:stop], dtype=np.float64)
                    yl = yl.reshape(m, *(info.y_shape or ())[1:])
                    if bad is not None:  # X was screened as it was read: y joins its flags
                        nonfinite_rows(yl, out=bad)
        except (OSError, KeyError, ValueError) as exc:  # e.g. a filter this HDF5 lacks
            raise DataError(f"'{path}:{what}' cannot be read ({exc})") from None
    block = Block(Xl, yl, info, start)
    return _handle_nonfinite(block, comm, nonfinite, bad)


def _read_shards(
    info: DataInfo, start: int, stop: int, comm: Communicator, nonfinite: str
) -> Block:
    """Global rows ``[start, stop)`` of the concatenated shards ``info.shards``: each piece is
    read from its file where it lies, with the per-file fast path (plain ``pread`` from threads
    when the data set is contiguous in its file, else h5py), screened for NaN/Inf as it is read.

    Ranks read different files, so no read here is collective: each rank opens only the files
    holding its rows (MPI-IO's collective buffering cannot help reads of disjoint files).
    """
    m = stop - start
    dtype = _feature_dtype(info.x_dtype)
    Xl = aligned_empty((m, info.n_features), dtype)
    yl = None if info.y is None else np.empty((m, *(info.y_shape or ())[1:]), dtype=np.float64)
    bad = np.zeros(m, dtype=bool)
    threads = _reader_threads(comm)

    def same_files() -> bool:  # every direct read's file is still the one rank 0 inspected
        check_identities(info, start, stop)
        return DIRECT_READ

    direct = agree(comm, same_files)
    # a piece that cannot be read on any rank fails every rank together
    agree(comm, lambda: read_range(info, start, stop, threads, direct, Xl, yl, bad))
    return _handle_nonfinite(Block(Xl, yl, info, start), comm, nonfinite, bad)


def check_identities(info: DataInfo, start: int, stop: int) -> None:
    """Every file holding global rows ``[start, stop)`` that is read directly is still the very
    file rank 0 inspected (a DataError naming it otherwise)."""
    for s in _files_of(info, start, stop):
        if s.identity is not None:
            try:
                compare_identity(s.path, s.identity, os.stat(s.path))
            except OSError as exc:
                raise DataError(f"'{s.path}' cannot be read ({exc.strerror})") from None


def _files(info: DataInfo) -> tuple[DataInfo, ...]:
    return info.shards or (info,)


def _parts(info: DataInfo, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    return shards.pieces(shards.offsets(_files(info)), start, stop)


def _files_of(info: DataInfo, start: int, stop: int) -> list[DataInfo]:
    return [_files(info)[i] for i, *_ in _parts(info, start, stop)]


def read_range(
    info: DataInfo,
    start: int,
    stop: int,
    threads: int,
    direct: bool,
    Xl: np.ndarray | None,
    yl: np.ndarray | None,
    bad: np.ndarray,
) -> None:
    """Global rows ``[start, stop)`` of the file (or of the concatenated shards) into ``Xl`` and
    ``yl``, setting ``bad`` for rows holding NaN or Inf. Each piece is read from its file where
    it lies, with the per-file fast path (plain ``pread`` from threads when the data set is
    contiguous in its file, the chunk reader when it is chunked, else h5py opened by this
    process alone). No collective call: a background thread may read ahead with it.
    ``Xl`` None: only the targets are read (and screened).
    """
    files = _files(info)
    for i, lo, hi, at in _parts(info, start, stop):
        s, k = files[i], hi - lo
        flags = bad[at : at + k]
        buf = None
        if Xl is not None:
            sdt = _feature_dtype(s.x_dtype)
            buf = Xl[at : at + k] if sdt == Xl.dtype else aligned_empty((k, info.n_features), sdt)
        ys = None if yl is None else yl[at : at + k]
        x_done = buf is None or (direct and s.x_offset is not None)
        y_done = ys is None or (direct and s.y_offset is not None)
        if buf is None:
            pass
        elif x_done:
            pread_rows(s.path, s.x_offset, lo, buf, threads, True, flags, s.identity)
        elif direct and s.x_chunks is not None:
            chunk_read.read_rows(
                s.path, info.x, s.x_chunks, lo, hi, buf, threads, s.identity, flags
            )
            x_done = True
        if ys is not None and y_done:
            pread_rows(s.path, s.y_offset, lo, ys.reshape(k, -1), threads, True, flags, s.identity)
        elif ys is not None and direct and s.y_chunks is not None:
            out = ys.reshape(k, -1)
            chunk_read.read_rows(
                s.path, info.y, s.y_chunks, lo, hi, out, threads, s.identity, flags
            )
            y_done = True
        if not (x_done and y_done):
            what = info.x
            try:
                with h5py.File(s.path, "r") as fh:
                    if not x_done:
                        dest = buf if s.x_ndim == 2 else buf.reshape(k)
                        fh[info.x].read_direct(dest, np.s_[lo:hi], np.s_[:])
                        nonfinite_rows(buf, out=flags)
                    if not y_done:
                        what = info.y
                        ys[...] = np.asarray(fh[info.y][lo:hi], dtype=np.float64).reshape(ys.shape)
                        nonfinite_rows(ys, out=flags)
            except (OSError, KeyError, ValueError) as exc:
                raise DataError(f"'{s.path}:{what}' cannot be read ({exc})") from None
        if buf is not None and buf.dtype != Xl.dtype:
            Xl[at : at + k] = buf


@dataclass(slots=True)
class MappedPiece:
    """Rows mapped from their file (``map_range``): X, y (None: not mapped), and the byte
    ranges to let go of once done with them (``drop``)."""

    X: np.ndarray
    y: np.ndarray | None
    spans: tuple[tuple[FileMap, int, int], ...]

    def drop(self) -> None:
        """Let go of the process's mapping of the rows' pages (the views stay valid)."""
        for fmap, lo, hi in self.spans:
            fmap.drop(lo, hi)


def map_range(
    info: DataInfo,
    start: int,
    stop: int,
    direct: bool,
    dtype,
    y_width: int,
    maps: dict[str, FileMap] | None = None,
) -> MappedPiece | None:
    """Global rows ``[start, stop)`` as read-only views of the file's pages
    (``direct_read.FileMap``): X, and y when it is stored as contiguous float64 (else None:
    read it with ``read_range``). None when X cannot be mapped: the rows span files, or X is
    not contiguous in its file or not stored in ``dtype`` itself. ``LEPTON_READ=pread`` turns
    mapping off. ``maps``: the caller's file mappings by path (made here when missing, kept for
    the caller's later pieces)."""
    if not (direct and MAP_READ):
        return None
    found = _mapped_file(info, start, stop)
    if found is None or np.dtype(found[0].x_dtype) != np.dtype(dtype):
        return None
    s, lo, hi = found
    fmap = _file_map({} if maps is None else maps, s)
    X = fmap.rows(s.x_offset, lo, hi, info.n_features, dtype)
    y = None
    if info.y is not None and s.y_offset is not None:
        y = fmap.rows(s.y_offset, lo, hi, y_width, np.float64)
    spans = tuple((fmap, a, b) for a, b in _byte_spans(info, s, lo, hi, dtype, y_width))
    return MappedPiece(X, y, spans)


def _mapped_file(info: DataInfo, start: int, stop: int):
    """(file, first row, end row) of rows ``[start, stop)`` as ``map_range`` maps them, or None
    where they are not mapped (they span files, or X is not contiguous in its file)."""
    parts = _parts(info, start, stop)
    if len(parts) != 1:
        return None
    i, lo, hi, _ = parts[0]
    s = _files(info)[i]
    return None if s.x_offset is None else (s, lo, hi)


def _byte_spans(info: DataInfo, s, lo: int, hi: int, dtype, y_width: int) -> list:
    """The file's byte ranges ``[a, b)`` of rows ``lo..hi`` as ``map_range`` maps them: X's, and
    y's when it is mapped too."""
    spans = [(s.x_offset, info.n_features * np.dtype(dtype).itemsize)]
    if info.y is not None and s.y_offset is not None:
        spans.append((s.y_offset, 8 * y_width))
    return [(offset + lo * row, offset + hi * row) for offset, row in spans]


def _file_map(maps: dict[str, FileMap], s) -> FileMap:
    """The mapping of file ``s`` in ``maps``, made into it when missing."""
    fmap = maps.get(s.path)
    if fmap is None:
        fmap = maps[s.path] = FileMap(s.path, s.identity)
    return fmap


def mapped_cached(
    info: DataInfo, start: int, stop: int, dtype, y_width: int, maps: dict[str, FileMap]
) -> bool | None:
    """Whether rows ``[start, stop)``, mapped with ``map_range``, are all in the page cache (X,
    and y when it is mapped too; ``direct_read.cached``). None where the rows are not mapped
    (they span files). Makes the file's mapping in ``maps`` if missing."""
    found = _mapped_file(info, start, stop)
    if found is None:
        return None
    s, lo, hi = found
    fd = _file_map(maps, s).fd
    return all(cached(fd, a, b - a) for a, b in _byte_spans(info, s, lo, hi, dtype, y_width))


def mapped_bounds(info: DataInfo, start: int, stop: int, unit: int, piece_bytes: int) -> list:
    """Pieces ``(a, b)`` of rows ``[start, stop)`` for mapped reads: each begins at the first
    row (a multiple of ``unit`` rows) at or after a 2 MiB boundary of the file, ``piece_bytes``
    (whole 2 MiB) apart, so its mapping is whole aligned 2 MiB spans but for its last partial
    unit (large page-cache folios then map as huge pages). Rows split between shards keep
    even pieces (None)."""
    files = _files(info)
    parts = _parts(info, start, stop)
    if len(parts) != 1 or files[parts[0][0]].x_offset is None or piece_bytes < MAP_ALIGN:
        return None
    i, lo, _, _ = parts[0]
    row = info.n_features * np.dtype(_feature_dtype(files[i].x_dtype)).itemsize
    off = files[i].x_offset + (lo - start) * row  # the file offset of global row 0, in effect
    first = (off + start * row) // MAP_ALIGN * MAP_ALIGN
    cuts = [start]
    for edge in range(first + piece_bytes, off + stop * row, piece_bytes):
        r = -(-(edge - off) // row)  # the first row at or after the edge...
        r = -(-r // unit) * unit  # ...on a unit boundary
        if cuts[-1] < r < stop:
            cuts.append(r)
    cuts.append(stop)
    return list(itertools.pairwise(cuts))


def _open(path: str, info: DataInfo, comm: Communicator) -> h5py.File:
    """The file for h5py reads: collectively under mpio, except when a data set is virtual
    (HDF5 refuses parallel reads of those): then every rank opens it alone."""
    return h5py.File(path, "r") if info.independent else open_read(path, comm)


def _same_file_everywhere(
    path: str, identity: tuple[int, int, int, int] | None, comm: Communicator
) -> bool:
    """Whether every rank sees at ``path`` the very file rank 0 inspected, so its offsets hold.

    A file replaced or rewritten since (another inode, size or modification time) is an error on
    every rank. The device number is not compared across ranks: a network file system (NFS,
    Lustre, GPFS) shows the same file with the same inode but each node's own device number.
    """
    if identity is None:
        return False

    def check() -> bool:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"'{path}' cannot be read ({exc.strerror})") from None
        return compare_identity(path, identity, st)

    agree(comm, check)  # raises on every rank together when any rank sees another file
    return True


def _reader_threads(comm: Communicator) -> int:
    return default_threads(comm)


def _piece(A: np.ndarray) -> int:
    """Rows per piece of a row copy: about 1 MiB."""
    return max(1, (1 << 20) // max(1, A[:1].nbytes))


def compact_rows(A: np.ndarray, keep: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``A[keep]`` in place: the kept rows moved to the front of ``A`` in order, piece by piece
    (a row only ever moves towards the front, so no row is overwritten before it is read);
    returns the leading view. ``A`` is then no longer the array it was: only for buffers the
    caller owns. ``out`` (as many rows as ``A`` at least): the rows go to its front instead."""
    out = A if out is None else out
    n = A.shape[0]
    step, dst = _piece(A), 0
    for a in range(0, n, step):
        b = min(n, a + step)
        part = A[a:b][keep[a:b]]
        out[dst : dst + part.shape[0]] = part
        dst += part.shape[0]
    return out[:dst]


def nonfinite_error(info: DataInfo, count: int, first: int, comm: Communicator) -> CollectiveError:
    """The error for ``count`` rows holding NaN or Inf (collective: every rank passes the same
    count), naming the first bad row of all ranks (``first``: this rank's, -1 for none) and, for
    shards, the file holding it and the row there."""
    mine = np.array([first if first >= 0 else np.iinfo(np.int64).max])
    row = int(comm.allreduce_min_(mine)[0])
    where = f"row {row}"
    if info.shards:
        shard, local = shards.locate(shards.offsets(info.shards), row)
        where = f"row {row}: '{info.shards[int(shard)].path}' row {int(local)}"
    return CollectiveError(
        f"'{info.path}': {count} rows hold NaN or Inf (first: {where}); "
        'fix the data or set data.nonfinite = "drop"',
        DataError.exit_code,
    )


def _handle_nonfinite(
    block: Block, comm: Communicator, policy: str, bad: np.ndarray | None = None
) -> Block:
    """NaN or Inf rows are an error naming the first bad row, or are dropped on request.

    ``bad``: the non-finite rows of X and y if the read already found them; None: screen both
    here.
    """
    if bad is None:
        bad = nonfinite_rows(block.X)
        if block.y is not None:
            nonfinite_rows(block.y, out=bad)
    counts = comm.allreduce_(np.array([np.count_nonzero(bad)], dtype=np.int64))
    if counts[0] == 0:
        return block
    info = block.info
    if policy == "error":
        first = block.rows[np.argmax(bad)] if bad.any() else -1
        raise nonfinite_error(info, int(counts[0]), first, comm)
    keep = ~bad  # the block is the reader's own buffer: the kept rows are moved up in place
    ids = block.rows[keep]
    y = None if block.y is None else compact_rows(block.y, keep)
    return Block(compact_rows(block.X, keep), y, info, block.start, ids)

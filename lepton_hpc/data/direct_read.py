"""Direct reads of contiguous HDF5 data sets: plain ``pread`` from threads, screened for NaN/Inf.

Used by ``reader.read_block`` when ``reader._direct`` proved that a data set's bytes are one
contiguous run in the file; h5py reads everything else. The file must still be the one whose
offsets were taken (``file_identity``), else nothing is read.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, prange

from ..errors import DataError
from ..kernels import native
from ..kernels.native.intrinsics import pread

READ_PIECE_BYTES = 64 << 20  # direct reads: at most this per thread task
MIN_PIECE_BYTES = 8 << 20  # ...and at least this, else two pieces per thread
SCREEN_READ_BYTES = 256 << 10  # screened reads: one pread this big, then its rows are screened


def in_opened_file(dset, st: os.stat_result) -> bool:
    """Whether ``dset`` lives in the file whose ``os.stat`` is ``st`` (not behind an external
    link): only then are its byte offsets offsets into that file."""
    try:
        own = os.stat(dset.file.filename)
    except (OSError, ValueError):
        return False
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, st_size, st_mtime_ns): what a direct read checks it is still reading."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def compare_identity(path: str, identity: tuple[int, int, int, int], st: os.stat_result) -> bool:
    """True when ``st`` is the inspected file (inode, size and modification time; not the
    device, which differs between the nodes mounting one network file system); else a
    DataError."""
    if file_identity(st)[1:] != identity[1:]:
        raise DataError(
            f"'{path}' changed while it was being read (its inode, size or modification time "
            "differ from when it was inspected); rerun once it is complete"
        )
    return True


SCREEN_GROUP_ROWS = 64  # the screen sums this many rows at a time (then checks them one by one)


@njit(nogil=True, fastmath={"reassoc"}, cache=True)
def _screen_piece(X, lo, hi, out, zero):
    """Set out[i] to True for each row i in lo..hi that holds NaN or Inf (no GIL held; exact).

    Groups of SCREEN_GROUP_ROWS rows are summed in X's own precision (``zero``: X.dtype's 0),
    as one flat SIMD sum: NaN and Inf propagate into it, so a finite sum clears the group. Only a
    group whose sum is not finite (bad values, or huge finite ones that overflow) is checked
    element by element. Only ``reassoc``: with nsz, Numba's isfinite folds to True
    (tests/unit/test_data_reader.py checks), so the tests are comparisons.
    """
    d = X.shape[1]
    flat = X.reshape(-1)
    for g0 in range(lo, hi, SCREEN_GROUP_ROWS):
        g1 = min(hi, g0 + SCREEN_GROUP_ROWS)
        seg = flat[g0 * d : g1 * d]  # a slice: unit stride, indices provably >= 0 (SIMD)
        s = zero
        for t in range(seg.size):
            s += seg[t]
        if not (abs(s) < math.inf):
            for i in range(g0, g1):
                finite = True
                for j in range(d):
                    finite &= abs(X[i, j]) < math.inf
                if not finite:  # only ever sets flags: X's and y's screens share ``out``
                    out[i] = True


@njit(nogil=True, cache=True)
def _read_screened(fd, base, out, lo, hi, step, bad, zero):
    """Rows lo..hi of ``out`` from ``fd`` (row 0 at byte ``base``), ``step`` rows per pread, each
    step screened for NaN/Inf while in L2. Without the GIL, so the reader's threads run it in
    parallel.
    Returns the first row not read: ``hi``, or where a pread failed or met the end of the file
    (the caller retries from there with ``os.preadv`` for the error).
    """
    row_bytes = out.shape[1] * out.itemsize
    data = out.ctypes.data
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        pos, end = a * row_bytes, b * row_bytes
        while pos < end:
            got = pread(fd, data + pos, end - pos, base + pos)
            if got <= 0:
                return a
            pos += got
        _screen_piece(out, a, b, bad, zero)
    return hi


def pread_rows(
    path: str,
    offset: int,
    start: int,
    out: np.ndarray,
    threads: int,
    screen: bool = False,
    flags: np.ndarray | None = None,
    identity: tuple[int, int, int, int] | None = None,
) -> np.ndarray | None:
    """Fill ``out`` (rows x width, C order) with rows ``start..`` of a contiguous data set at byte
    ``offset`` of ``path``, with ``pread`` from ``threads`` threads, two pieces per thread
    (8 to 64 MiB each: big pieces read fastest).

    Why not h5py here: h5py holds the GIL while HDF5 reads, so one rank's read uses one core;
    plain preads release it, so the copy from the page cache (or the file system) and the
    first-touch zeroing of the new pages run on every core the rank owns. ``screen`` (float
    ``out``): each piece is read SCREEN_READ_BYTES at a time and those rows are checked for
    NaN/Inf at once, while they are still in L2 (``_read_screened``; where the tuned native
    code is off, whole pieces are read and then screened); returns the rows holding NaN or Inf,
    or None without ``screen``.
    ``flags``: with ``screen``, set those rows in this array (X's flags, when y is read after
    X) instead of in a new one; rows already set stay set.
    Without ``screen`` the reads are plain ``os.preadv`` calls of whole pieces (the benchmark's
    raw read). ``identity`` (``file_identity`` of the file whose ``offset`` was taken): the
    opened descriptor must still be that file, else a DataError and nothing is read.
    """
    m = out.shape[0]
    row_bytes = out.shape[1] * out.itemsize
    flat = out.reshape(-1).view(np.uint8)
    piece_bytes = min(READ_PIECE_BYTES, max(MIN_PIECE_BYTES, m * row_bytes // (2 * threads)))
    per = max(1, piece_bytes // max(row_bytes, 1))
    pieces = [(a, min(m, a + per)) for a in range(0, m, per)]
    bad = (np.zeros(m, dtype=bool) if flags is None else flags) if screen else None
    step = max(1, SCREEN_READ_BYTES // max(row_bytes, 1))
    zero = out.dtype.type(0)
    base = offset + start * row_bytes
    fd = os.open(path, os.O_RDONLY)
    if identity is not None:
        try:
            compare_identity(path, identity, os.fstat(fd))
        except DataError:
            os.close(fd)
            raise

    def read(piece: tuple[int, int]) -> None:
        a, b = piece
        if bad is not None and native.supported()[0]:  # the screened reads call libc directly
            a = _read_screened(fd, base, out, a, b, step, bad, zero)
            if a == b:
                return
        view = memoryview(flat[a * row_bytes : b * row_bytes])
        pos = 0
        while pos < len(view):  # errors (OSError) and the end of the file surface here
            got = os.preadv(fd, [view[pos:]], base + a * row_bytes + pos)
            if got == 0:
                raise DataError(f"'{path}' ends before the data it describes (truncated file?)")
            pos += got
        if bad is not None:
            _screen_piece(out, a, b, bad, zero)

    try:
        if threads > 1 and len(pieces) > 1:
            with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
                list(pool.map(read, pieces))
        else:
            for piece in pieces:
                read(piece)
    finally:
        os.close(fd)
    return bad


@njit(parallel=True, cache=True)
def _screen_parallel(X, out, zero):
    """``_screen_piece`` over chunks of 16K rows in parallel."""
    chunk = 16384
    for c in prange((X.shape[0] + chunk - 1) // chunk):
        _screen_piece(X, c * chunk, min(X.shape[0], (c + 1) * chunk), out, zero)


def nonfinite_rows(X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """True for each row of ``X`` (1-D: each value) holding NaN or Inf, OR-ed into ``out``.

    ``_screen_piece`` on Numba's threads (sized per rank; BLAS's would oversubscribe a node
    shared by ranks) for C-ordered float arrays: one SIMD sum per 64 rows, at memory speed.
    """
    bad = np.zeros(X.shape[0], dtype=bool) if out is None else out
    if X.size == 0:
        return bad
    rows = X.reshape(X.shape[0], -1)
    if X.dtype in (np.float32, np.float64) and rows.flags.c_contiguous:
        _screen_parallel(rows, bad, X.dtype.type(0))
    else:
        bad |= ~np.isfinite(rows).all(axis=1)
    return bad


MAP_ALIGN = 2 << 20  # mappings start on a 2 MiB boundary of the file: large page-cache folios
# are then mapped as huge pages (fewer TLB misses for the kernel reading them)


class FileMap:
    """A read-only mapping of one whole file for a stream's passes: rows are views of the
    file's pages, mapped into the process when asked for (``rows``) and let go when done with
    (``drop``). The mapping itself is made once: a mapping per piece costs a ``mmap`` and a
    ``munmap`` each time, and 1.5-2 ms more per 512 MiB pass here (4M x 32 float32: 26.7 and
    25.4 ms a pass against 24.5 and 24.4 with one mapping, the in-memory kernel 20.8 ms).

    The descriptor stays open for the stream's life: the kernel's read-ahead state lives with
    it, and grows to 2 MiB page-cache folios over a file read in order (a descriptor per piece
    starts small every time, and the pages cannot then be mapped as huge pages). The mapping is
    read-only and shared, and the descriptor read-only: the file cannot be changed through it.
    (A private writable mapping would give the kernels their usual array type, but it cannot map
    large page-cache folios as huge pages: twice the cost of mapping here.)

    Pages mapped into the process count in its resident memory until dropped; they stay the
    kernel's to evict, as clean page cache. A view used after its pages were dropped is still
    the file's bytes (its pages are mapped again): dropping is never a question of correctness.
    A file truncated while mapped makes the next access of a page past its end fault (SIGBUS):
    ``rows`` checks the file's identity before each piece, which narrows that window to the
    time one piece is in use."""

    def __init__(self, path: str, identity: tuple[int, int, int, int] | None = None) -> None:
        self.path, self.identity = path, identity
        self.fd = os.open(path, os.O_RDONLY)
        self._closed = weakref.finalize(self, os.close, self.fd)
        self._map: mmap.mmap | None = None
        self._size = 0

    def _mapping(self, st: os.stat_result) -> mmap.mmap:
        if self._map is None or st.st_size != self._size:
            self.forget()
            self._map = mmap.mmap(self.fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            self._size = st.st_size
            with contextlib.suppress(AttributeError, OSError):  # the kernel's read-ahead then
                self._map.madvise(mmap.MADV_HUGEPAGE)  # fills the cache with 2 MiB folios
        return self._map

    def rows(self, offset: int, start: int, stop: int, width: int, dtype) -> np.ndarray:
        """Rows ``start..stop`` of a contiguous (n, ``width``) data set at byte ``offset`` as a
        read-only view of the file's pages, mapped now (reading those not cached, at the
        device's rate): their 2 MiB spans whole, so that large folios map as huge pages."""
        dtype = np.dtype(dtype)
        row_bytes = width * dtype.itemsize
        lo, hi = offset + start * row_bytes, offset + stop * row_bytes
        if hi == lo:
            return np.empty((0, width), dtype)
        st = os.fstat(self.fd)
        if self.identity is not None:
            compare_identity(self.path, self.identity, st)
        if hi > st.st_size:
            raise DataError(
                f"'{self.path}' ends at byte {st.st_size}, before its rows' last byte {hi}"
            )
        m = self._mapping(st)
        base, end = lo // MAP_ALIGN * MAP_ALIGN, min(st.st_size, -(-hi // MAP_ALIGN) * MAP_ALIGN)
        _populate(m, base, end - base)
        return np.frombuffer(m, dtype, (stop - start) * width, lo).reshape(stop - start, width)

    def drop(self, lo: int, hi: int) -> None:
        """Let go of the process's mapping of the pages in the 2 MiB spans that lie within bytes
        ``[lo, hi)`` rounded down to 2 MiB (``MADV_DONTNEED``: the pages stay in the page cache;
        the span holding ``hi`` may hold the next rows'). Views stay valid."""
        lo, hi = lo // MAP_ALIGN * MAP_ALIGN, min(self._size, hi // MAP_ALIGN * MAP_ALIGN)
        if self._map is not None and hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def forget(self) -> None:
        """Let go of every mapped page and of the mapping (unmapped once no view uses it)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, 0, self._size)
            with contextlib.suppress(BufferError):  # views alive: it goes with the last of them
                self._map.close()
        self._map = None

    def close(self) -> None:
        self.forget()
        self._closed()


class _CachestatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Cachestat(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    )


_SYS_CACHESTAT = 451  # Linux 6.5, the same number on every architecture
_LIBC: list = []  # libc, loaded when first needed


def cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of bytes ``[offset, offset + length)`` of ``fd`` is in the page cache
    (Linux's ``cachestat``, which reads nothing: a probing read would start the kernel's
    read-ahead, in small folios). False where the kernel lacks the call."""
    if length <= 0:
        return True
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    page = mmap.PAGESIZE
    first, last = offset // page, (offset + length - 1) // page
    stat = _Cachestat()
    rng = _CachestatRange(first * page, (last - first + 1) * page)
    if _LIBC[0].syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        return False
    return stat.nr_cache == last - first + 1


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14


def _populate(m: mmap.mmap, start: int, length: int) -> None:
    """Map every page of bytes ``[start, start + length)`` of ``m`` now, reading those not
    cached (``start`` on a page). Where the advice is unknown, each page is touched once
    instead (one read fault per page)."""
    try:
        m.madvise(MADV_POPULATE_READ, start, length)
    except OSError:
        np.frombuffer(m, np.uint8, length, start)[:: mmap.PAGESIZE].max(initial=0)

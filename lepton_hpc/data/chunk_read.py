"""Direct reads of chunked HDF5 data sets: each chunk's bytes read with ``pread`` at the offset
HDF5's chunk index gives, decoded (deflate, lzf, szip, bzip2, zstd, LZ4, Blosc, Blosc2,
bitshuffle, ZFP, SZ, SZ3, SPERR, FCIDecomp, HTJ2K, shuffle, fletcher32) and copied into the rank's
rows, on the rank's threads.

Why not h5py: h5py holds the GIL while HDF5 reads and decompresses, so one rank uses one core
for the whole of its block. Here ``pread``, ``bz2``, the Numba LZF, LZ4 and bitshuffle
decoders, the system's libdeflate, libzstd and liblz4 through ``ctypes`` (else ``zlib`` and the
``zstandard`` and ``lz4`` packages), ``blosc`` (told to) and NumPy's copies release it, so the
rank's cores decode chunks in parallel. Each thread reads and decodes into buffers it keeps
from chunk to chunk (``Scratch``) and, for chunks of whole rows, into the rows themselves:
no chunk-sized allocation whose pages fault in again for every chunk.

Correct bytes come first. ``layout`` accepts a data set only when every chunk can be proved
decodable: chunked storage in the opened file itself (no virtual, external or compact layout),
little-endian stored types whose conversion to the read type is exact, and only the filters
deflate (1), shuffle (2), fletcher32 (3), szip (4: HDF5's own, by the system's libsz, the
library HDF5 calls: ``szip``), lzf (32000), hdf5plugin's and PyTables' bzip2 (307:
one bzip2 stream a chunk, checked by its CRCs) and, when the package decoding each is
installed (for zstd and LZ4: or the system's library loads), hdf5plugin's zstd (32015,
``zstandard``: one zstd frame per chunk, its content size in the frame header), LZ4 (32004,
``lz4``: sizes in a header and before each block), Blosc
(32001, ``blosc``: a Blosc buffer, which undoes its own shuffle), Blosc2 (32026, ``blosc2``: a
frame a chunk; it holds the GIL, so a chunk is decoded by Blosc2's own threads) and bitshuffle
(32008, alone or with LZ4 or zstd: its blocks and bit transpose in one Numba call a chunk,
without the GIL; zstd blocks need the system's libzstd) and ZFP (32013, by the zfp library in
hdf5plugin's plugin, without HDF5: ``zfp``), with at most one compressor.
A chunk that still cannot be proved right when it is read goes through h5py alone (one chunk,
not the data set): a chunk never written (HDF5 gives the fill value), a filter mask naming a
filter the pipeline lacks, a stored size or decoded size that is not the chunk's, a fletcher32
checksum that does not match (h5py then also accepts the byte order of old writers, or gives
the error), and partial edge chunks of a pipeline with nothing that checks its input
(shuffle, lzf, szip, bitshuffle alone, ZFP, SZ, SZ3, SPERR, FCIDecomp, HTJ2K: a writer may store
those unfiltered, which nothing in the bytes would reveal; deflate, bzip2, zstd, LZ4, Blosc,
compressing bitshuffle and fletcher32 refuse bytes they did not write).

A filter whose bit is set in a chunk's filter mask was skipped when the chunk was written (an
optional filter that failed, as lzf and zstd do when a chunk does not shrink): it is skipped
when decoding, exactly as HDF5 does.

Filters from ``hdf5plugin`` (``plugins``) are registered when this module is imported, so the
h5py reads of every reader can decode them. SZ (32017), SZ3 (32024), SPERR (32028), FCIDecomp
(32018) and HTJ2K (32033) are decoded on the threads by the plugin's own filter function, in a
private instance of the plugin whose HDF5 calls are no-ops (``plugin_filters``: the instance
HDF5 uses would call HDF5 on failure, which is not safe on two threads at once; SZ, whose
library keeps its parameters in globals, gets one instance per busy thread).
"""

from __future__ import annotations

import bz2
import functools
import importlib
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
from numba import njit

from ..errors import DataError
from ..kernels import native
from . import lzf, native_codecs, plugin_filters, plugins, szip, zfp
from .direct_read import (
    SCREEN_READ_BYTES,
    _read_screened,
    _screen_piece,
    compare_identity,
    in_opened_file,
    nonfinite_rows,
)

DEFLATE, SHUFFLE, FLETCHER32, LZF, ZSTD, LZ4, BLOSC = 1, 2, 3, 32000, 32015, 32004, 32001
BITSHUFFLE, BZIP2, BLOSC2, ZFP, SZIP = 32008, 307, 32026, 32013, 4
# hdf5plugin's SZ, SZ3, SPERR, FCIDecomp and HTJ2K: their own filter functions, HDF5-free
# (``plugin_filters``)
PRIVATE = frozenset(plugin_filters.LIBRARIES)
COMPRESSORS = {DEFLATE, LZF, ZSTD, LZ4, BLOSC, BITSHUFFLE, BZIP2, BLOSC2, ZFP, SZIP} | PRIVATE
# Filters that refuse input they did not produce (zlib's and zstd's framing, bzip2's CRCs, the
# checksum, the sizes in LZ4's, Blosc's, Blosc2 frames' and compressing bitshuffle's headers): a
# chunk stored unfiltered cannot pass for a filtered one. (Bitshuffle alone checks nothing.)
CHECKED = {DEFLATE, FLETCHER32, ZSTD, LZ4, BLOSC, BITSHUFFLE, BZIP2, BLOSC2}
# Bitshuffle's client values: (major, minor, element size, block size in elements (0: its
# default), compression: 0 none, 2 LZ4, 3 zstd[, level])
BSHUF_NONE, BSHUF_LZ4, BSHUF_ZSTD = 0, 2, 3

plugins.load()  # hdf5plugin's filters for every h5py read in this process, before any file opens


def _optional(name: str):
    """The module ``name``, or None when it is not installed (its filter then goes through
    h5py)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_ZSTD = _optional("zstandard")
_LZ4 = _optional("lz4.block")
_BLOSC = _optional("blosc")
_BLOSC2 = _optional("blosc2")
if _BLOSC is not None:  # one thread per call, the GIL let go: chunks decode on the rank's threads
    _BLOSC.set_nthreads(1)
    _BLOSC.set_releasegil(True)
if _BLOSC2 is not None:  # ``decompress2`` lets the GIL go (``_blosc2_decode``)
    _BLOSC2.set_releasegil(True)
# zstd and LZ4 decode through the system's libzstd and liblz4 when they load (into the
# threads' reused buffers, ``native_codecs``), else through the packages.
_NATIVE_ZSTD = native_codecs.zstd_available()
_NATIVE_LZ4 = native_codecs.lz4_available()
_NATIVE_DEFLATE = native_codecs.deflate_available()  # libdeflate: else ``zlib``
_NATIVE_LZ4_BLOCKS = native_codecs.LZ4_IN_NUMBA  # bitshuffle's LZ4 blocks by liblz4 from Numba
FILTERS = {DEFLATE, SHUFFLE, FLETCHER32, LZF, BITSHUFFLE, BZIP2} | {
    fid
    for fid, usable in (
        (ZSTD, _ZSTD is not None or _NATIVE_ZSTD),
        (LZ4, _LZ4 is not None or _NATIVE_LZ4),
        (BLOSC, _BLOSC is not None),
        (BLOSC2, _BLOSC2 is not None),
        (ZFP, zfp.available()),
        (SZIP, szip.available()),
        *((fid, plugin_filters.present(fid)) for fid in PRIVATE),
    )
    if usable
}
# Compressors decoded by a library called through ``ctypes`` straight into the caller's buffer:
# decode_into(stored bytes, filter values, out) -> whether ``out`` holds the chunk.
DECODE_INTO = {
    ZFP: zfp.decode_into,
    SZIP: szip.decode_into,
    **{fid: functools.partial(plugin_filters.decode_into, fid) for fid in PRIVATE},
}


def private_loaded(fids) -> bool:
    """Whether the private plugin instance (``plugin_filters``) of each of ``fids`` that needs
    one loads here: where one does not, HDF5 decodes the data set (``layout``, ``inspect``)."""
    return all(plugin_filters.available(f) for f in fids if f in PRIVATE)


# Bitshuffle's compressions decoded here, each chunk in one Numba call without the GIL (its
# LZ4 blocks too: no package needed; its zstd blocks by the system's libzstd, else h5py).
BSHUF_CODECS = {BSHUF_NONE, BSHUF_LZ4} | ({BSHUF_ZSTD} if native_codecs.ZSTD_IN_NUMBA else set())

# Stored types read directly, per read type. Features (float32) only where the conversion is
# exact (every stored value is a float32), so NumPy's cast equals HDF5's, which the h5py path
# uses, bit for bit. Targets (float64) are cast by NumPy on every path, so every integer works.
EXACT = {
    np.dtype(np.float32).str: {"<f4", "<f2", "|i1", "<i2", "|u1", "<u2"},
    np.dtype(np.float64).str: {
        *("<f8", "<f4", "<f2", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8"),
    },
}


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """How a chunked data set is stored: what ``read_rows`` needs besides the chunk index."""

    shape: tuple[int, ...]  # the data set's (1-D or 2-D)
    chunks: tuple[int, ...]
    dtype: str  # as stored (little-endian)
    filters: tuple[tuple[int, tuple[int, ...]], ...]  # (id, client values) in pipeline order

    @property
    def rows_cols(self) -> tuple[int, int, int, int]:
        """(rows, columns, chunk rows, chunk columns): a 1-D data set is one column."""
        n = self.shape[0]
        w = self.shape[1] if len(self.shape) == 2 else 1
        cr = self.chunks[0]
        cc = self.chunks[1] if len(self.chunks) == 2 else 1
        return n, w, cr, cc


def layout(dset: h5py.Dataset, want: np.dtype, st: os.stat_result) -> ChunkLayout | None:
    """The ChunkLayout of ``dset`` when its chunks can be read directly as ``want`` from the
    opened file (``st``: its ``os.stat``); else None (h5py reads it)."""
    if dset.is_virtual:
        return None
    plist = dset.id.get_create_plist()
    missing = plugins.missing_filter_error(dset, plist)
    if missing is not None:  # every later read would fail deep inside HDF5
        raise missing
    if not np.little_endian or dset.ndim not in (1, 2):
        return None
    stored = dset.dtype
    if stored.kind not in "fiu" or stored.str not in EXACT.get(want.newbyteorder("<").str, ()):
        return None
    if plist.get_layout() != h5py.h5d.CHUNKED or plist.get_external_count() != 0:
        return None
    filters = []
    for i in range(plist.get_nfilters()):
        fid, _flags, values, _name = plist.get_filter(i)
        if fid not in FILTERS:
            return None
        filters.append((int(fid), tuple(int(v) for v in values)))
    if any(f == SHUFFLE and v and v[0] != stored.itemsize for f, v in filters):
        return None
    if any(
        f == BITSHUFFLE and (len(v) < 5 or v[2] != stored.itemsize or v[4] not in BSHUF_CODECS)
        for f, v in filters
    ):
        return None
    chunks = plist.get_chunk()
    chunk_bytes = int(np.prod(chunks)) * stored.itemsize
    if any(f == ZFP and (zfp.parse(v) or (0, 0, -1))[2] != chunk_bytes for f, v in filters):
        return None  # ZFP values this cannot read: HDF5 decodes them, or says why not
    if not private_loaded(f for f, _ in filters):
        return None  # a private plugin instance did not load (plugin_filters): HDF5 decodes it
    if sum(f in COMPRESSORS for f, _ in filters) > 1:
        return None  # the inner compressor's output size is not known: h5py decodes those
    if not in_opened_file(dset, st):
        return None  # an external link: the chunks are in another file
    if len(chunks) != dset.ndim or min(chunks) < 1:
        return None
    return ChunkLayout(
        tuple(int(s) for s in dset.shape),
        tuple(int(c) for c in chunks),
        stored.str,
        tuple(filters),
    )


@njit(nogil=True, cache=True)
def _fletcher32(data):
    """HDF5's Fletcher-32 of the bytes ``data`` (H5_checksum_fletcher32: big-endian 16-bit words,
    sums folded every 360 words)."""
    n = data.size // 2
    sum1 = np.uint32(0)
    sum2 = np.uint32(0)
    i = 0
    while n > 0:
        t = min(n, 360)
        n -= t
        for _ in range(t):
            sum1 += (np.uint32(data[i]) << np.uint32(8)) | np.uint32(data[i + 1])
            i += 2
            sum2 += sum1
        sum1 = (sum1 & np.uint32(0xFFFF)) + (sum1 >> np.uint32(16))
        sum2 = (sum2 & np.uint32(0xFFFF)) + (sum2 >> np.uint32(16))
    if data.size % 2:
        sum1 += np.uint32(data[i]) << np.uint32(8)
        sum2 += sum1
        sum1 = (sum1 & np.uint32(0xFFFF)) + (sum1 >> np.uint32(16))
        sum2 = (sum2 & np.uint32(0xFFFF)) + (sum2 >> np.uint32(16))
    sum1 = (sum1 & np.uint32(0xFFFF)) + (sum1 >> np.uint32(16))
    sum2 = (sum2 & np.uint32(0xFFFF)) + (sum2 >> np.uint32(16))
    return (sum2 << np.uint32(16)) | sum1


@njit(nogil=True, cache=True)
def _unshuffle(src, itemsize, out):
    """HDF5's shuffle undone into ``out`` (uint8, ``src``'s size), returned: byte b of element i
    is at ``src[b * n + i]`` (no GIL held).

    Sizes 2, 4 and 8 assemble each little-endian element from its planes in one pass (SIMD);
    a byte-by-byte scatter is a third as fast.
    """
    n = src.size // itemsize
    if itemsize == 4:
        out4 = out.view(np.uint32)
        p0, p1, p2, p3 = src[:n], src[n : 2 * n], src[2 * n : 3 * n], src[3 * n : 4 * n]
        for i in range(n):
            out4[i] = (
                np.uint32(p0[i])
                | (np.uint32(p1[i]) << np.uint32(8))
                | (np.uint32(p2[i]) << np.uint32(16))
                | (np.uint32(p3[i]) << np.uint32(24))
            )
        return out
    if itemsize == 8:
        out8 = out.view(np.uint64)
        for i in range(n):
            v = np.uint64(0)
            for b in range(8):
                v |= np.uint64(src[b * n + i]) << np.uint64(8 * b)
            out8[i] = v
        return out
    if itemsize == 2:
        out2 = out.view(np.uint16)
        q0, q1 = src[:n], src[n : 2 * n]
        for i in range(n):
            out2[i] = np.uint16(q0[i]) | (np.uint16(q1[i]) << np.uint16(8))
        return out
    for b in range(itemsize):
        plane = src[b * n : (b + 1) * n]
        for i in range(n):
            out[i * itemsize + b] = plane[i]
    return out


def _blosc2_decode(
    buf: bytes, nbytes: int, into: np.ndarray | None = None, threads: int = 1
) -> bytes | np.ndarray | None:
    """One Blosc2 frame (hdf5plugin's Blosc2 filter, 32026: a super-chunk frame a chunk, with
    b2nd metadata for its shape) holding exactly ``nbytes`` bytes, or None.

    A b2nd array stores its blocks one after another: where they are whole rows and fill the
    one chunk exactly (the usual case), that is C order and the chunk is decoded straight into
    ``into``; else b2nd assembles the C-order array (a copy). The frame's metadata is read from
    the super-chunk (3 us) rather than through a b2nd array object (23 us a chunk).

    ``threads``: how many of the rank's threads decode chunks at once. Decoding from the frame
    holds the GIL, so with more than one the frame's chunk is taken out (a copy, a fifth of
    the decoding time) and decoded by ``blosc2.decompress2``, which lets the GIL go; the other
    layouts are decoded by that many of Blosc2's own threads."""
    try:
        schunk = _BLOSC2.schunk_from_cframe(buf, copy=False)
        if schunk.nbytes < nbytes:
            return None
        schunk.dparams = _blosc2_dparams(max(1, threads))
        if "b2nd" not in schunk.meta:
            out = schunk[:]
            return out if len(out) == nbytes else None
        meta = schunk.meta["b2nd"]  # [version, ndim, shape, chunk shape, block shape, ...]
        if (
            isinstance(meta, list)
            and len(meta) >= 5
            and meta[2] == meta[3]
            and meta[4][1:] == meta[2][1:]
            and meta[2][0] % meta[4][0] == 0
            and schunk.nchunks == 1
            and schunk.nbytes == nbytes
        ):
            out = into if into is not None else np.empty(nbytes, dtype=np.uint8)
            if threads > 1:
                _BLOSC2.decompress2(schunk.get_chunk(0), dst=out, nthreads=1)
            else:
                schunk.decompress_chunk(0, out)
            return out
        arr = _BLOSC2.ndarray_from_cframe(buf, copy=False)
        arr.schunk.dparams = schunk.dparams
        out = np.ascontiguousarray(arr[...]).reshape(-1).view(np.uint8)
        return out if out.size == nbytes else None
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError):
        return None


@functools.cache
def _blosc2_dparams(threads: int):
    return _BLOSC2.DParams(nthreads=threads)


def _bz2_decode(buf, nbytes: int) -> bytes | None:
    """One bzip2 stream (hdf5plugin's and PyTables' filter 307) holding exactly ``nbytes``
    bytes, or None: damaged data fails bzip2's block and stream CRCs. ``bz2`` lets go of the
    GIL while it decompresses; at most ``nbytes + 1`` bytes are ever made."""
    dec = bz2.BZ2Decompressor()
    try:
        out = dec.decompress(buf, max_length=nbytes + 1)
    except (OSError, ValueError, EOFError):
        return None
    return out if dec.eof and not dec.unused_data and len(out) == nbytes else None


def _zstd_decode(
    buf: bytes | np.ndarray, nbytes: int, into: np.ndarray | None = None
) -> bytes | np.ndarray | None:
    """One zstd frame holding exactly ``nbytes`` bytes, as hdf5plugin's filter writes and reads
    it (its content size from the frame header; no bytes after the frame), or None. With the
    system's libzstd it is decoded into ``into`` (``nbytes`` bytes, uint8) when given."""
    if _NATIVE_ZSTD:
        out = into if into is not None else np.empty(nbytes, dtype=np.uint8)
        return out if native_codecs.zstd_frame_into(_as_bytes_array(buf), out) else None
    zstandard = _ZSTD
    try:
        if zstandard.get_frame_parameters(buf).content_size != nbytes:
            return None  # no size in the header: HDF5's filter cannot size its output either
        out = zstandard.ZstdDecompressor().decompress(buf, allow_extra_data=False)
    except zstandard.ZstdError:
        return None
    return out if len(out) == nbytes else None


def _lz4_decode(
    buf: bytes | np.ndarray, nbytes: int, into: np.ndarray | None = None
) -> np.ndarray | None:
    """The LZ4 filter's chunk (hdf5plugin's, HDF5 filter 32004) holding exactly ``nbytes``
    bytes, or None: a big-endian 8-byte size and 4-byte block size, then per block a big-endian
    4-byte stored size and the block, raw where that size is the block's own (as H5Zlz4.c
    reads it). Every size is checked against the chunk's and the stored bytes. The blocks are
    decoded into ``into`` (``nbytes`` bytes, uint8) when given: by the system's liblz4 when it
    loads, else by the ``lz4`` package (then copied there)."""
    src = _as_bytes_array(buf)
    if src.size < 12:
        return None
    size, block = int.from_bytes(src[:8], "big"), int.from_bytes(src[8:12], "big")
    if size != nbytes or block <= 0:
        return None
    block = min(block, size)
    out = into if into is not None else np.empty(nbytes, dtype=np.uint8)
    pos, done = 12, 0
    while done < size:
        want = min(block, size - done)
        if pos + 4 > src.size:
            return None
        stored = int.from_bytes(src[pos : pos + 4], "big")
        pos += 4
        if stored <= 0 or pos + stored > src.size:
            return None
        part, dst = src[pos : pos + stored], out[done : done + want]
        if stored == want:
            dst[:] = part
        elif _NATIVE_LZ4:
            if not native_codecs.lz4_block_into(part, dst):
                return None
        else:
            got = _lz4_block(part, want)
            if got is None:
                return None
            dst[:] = np.frombuffer(got, dtype=np.uint8)
        pos += stored
        done += want
    return out if pos == src.size else None


def _as_bytes_array(buf) -> np.ndarray:
    """``buf`` (bytes or a contiguous uint8 array) as a uint8 array, without a copy."""
    return buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)


def _blosc_decode(
    buf: bytes, nbytes: int, into: np.ndarray | None = None
) -> bytes | np.ndarray | None:
    """One Blosc buffer (hdf5plugin's Blosc filter, 32001) holding exactly ``nbytes`` bytes, or
    None: its header's sizes (little-endian at bytes 4 and 12) must be the chunk's and the
    stored bytes'. Blosc undoes its own shuffle. ``into``: ``nbytes`` contiguous bytes (uint8)
    to decode into, returned (Blosc writes the size in the header checked here, no more)."""
    if len(buf) < 16:
        return None
    head = bytes(buf[:16])
    if int.from_bytes(head[4:8], "little") != nbytes:
        return None
    if int.from_bytes(head[12:16], "little") != len(buf):
        return None
    try:
        if into is not None:
            return into if _BLOSC.decompress_ptr(buf, into.ctypes.data) == nbytes else None
        out = _BLOSC.decompress(buf)
    except (RuntimeError, ValueError, TypeError):
        return None
    return out if len(out) == nbytes else None


@njit(nogil=True, cache=True, inline="always")
def _transpose8(x):
    """The 8 x 8 bit matrix in ``x`` (byte k = row k) transposed."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << np.uint64(28))


@njit(nogil=True, cache=True)
def _bit_unshuffle(src, n, size, out):
    """Bitshuffle's transpose undone for ``n`` elements (a multiple of 8) of ``size`` bytes:
    bit k of byte j of element i is bit i % 8 of byte ``(8 j + k) n / 8 + i // 8`` of ``src``.

    First each byte plane j (byte j of every element) is made whole: the 8 bytes of 8 bit rows
    at one place are one 64-bit word, transposed as an 8 x 8 bit matrix. The planes are then
    HDF5's shuffle of the elements, undone by ``_unshuffle``. Every loop reads and writes slices
    at a running index from 0, which LLVM vectorises (6.3 GB/s for 4-byte elements here;
    indexing the whole arrays at computed offsets kept it scalar, at 1.3 GB/s)."""
    row = n // 8
    planes = np.empty(size * row, np.uint64)
    for j in range(size):
        b = j * n
        s0, s1 = src[b : b + row], src[b + row : b + 2 * row]
        s2, s3 = src[b + 2 * row : b + 3 * row], src[b + 3 * row : b + 4 * row]
        s4, s5 = src[b + 4 * row : b + 5 * row], src[b + 5 * row : b + 6 * row]
        s6, s7 = src[b + 6 * row : b + 7 * row], src[b + 7 * row : b + 8 * row]
        plane = planes[j * row : (j + 1) * row]
        for q in range(row):
            x = (
                np.uint64(s0[q])
                | (np.uint64(s1[q]) << np.uint64(8))
                | (np.uint64(s2[q]) << np.uint64(16))
                | (np.uint64(s3[q]) << np.uint64(24))
                | (np.uint64(s4[q]) << np.uint64(32))
                | (np.uint64(s5[q]) << np.uint64(40))
                | (np.uint64(s6[q]) << np.uint64(48))
                | (np.uint64(s7[q]) << np.uint64(56))
            )
            plane[q] = _transpose8(x)
    _unshuffle(planes.view(np.uint8), size, out)  # byte j of element i is at j * n + i


@njit(nogil=True, cache=True)
def _lz4_more(src, i, e, n):
    """An LZ4 length ``n`` of 15 continues in the bytes at ``i`` (each adds itself, until one
    below 255): (the length, the position after it), or (-1, i) when the block ends first."""
    while True:
        if i >= e:
            return -1, i
        b = np.int64(src[i])
        i += 1
        n += b
        if b != 255:
            return n, i


@njit(nogil=True, cache=True)
def _lz4_block_into(src, i, e, dst, o, end):
    """One raw LZ4 block ``src[i:e]`` decoded into exactly ``dst[o:end]``: False if it is
    damaged or does not fill it exactly (no byte outside either range is read or written).
    Copies loop over slices from 0, which LLVM turns into memcpy-like code (slice assignment
    was 10x slower); an overlapping match copies forward byte by byte, repeating its pattern
    as LZ4 means it to."""
    start = o
    while True:
        if i >= e:
            return False
        token = np.int64(src[i])
        i += 1
        lit = token >> 4
        if lit == 15:
            lit, i = _lz4_more(src, i, e, lit)
        if lit < 0 or lit > e - i or lit > end - o:
            return False
        d, s = dst[o : o + lit], src[i : i + lit]
        for j in range(lit):
            d[j] = s[j]
        i += lit
        o += lit
        if i == e:  # the last sequence holds literals only
            return o == end
        if e - i < 2:
            return False
        off = np.int64(src[i]) | (np.int64(src[i + 1]) << 8)
        i += 2
        if off == 0 or off > o - start:
            return False
        ml = token & 15
        if ml == 15:
            ml, i = _lz4_more(src, i, e, ml)
            if ml < 0:
                return False
        ml += 4
        if ml > end - o:
            return False
        d, s = dst[o : o + ml], dst[o - off : o - off + ml]
        for j in range(ml):
            d[j] = s[j]
        o += ml


@njit(nogil=True, cache=True)
def _big_endian(src, i, k):
    v = np.int64(0)
    for j in range(k):
        v = (v << 8) | np.int64(src[i + j])
    return v


@njit(nogil=True, cache=True)
def _lz4_block_c(src, i, e, dst, o, end):
    """``_lz4_block_into`` by the system's liblz4 (twice as fast): False when the block is
    damaged or does not fill ``dst[o:end]`` exactly. The caller checks both ranges."""
    if e - i <= 0 or e - i >= 2**31 or end - o >= 2**31:
        return False
    got = native_codecs.lz4_decompress_safe(
        np.intp(src.ctypes.data) + i,
        np.intp(dst.ctypes.data) + o,
        np.int32(e - i),
        np.int32(end - o),
    )
    return got == end - o


@njit(nogil=True, cache=True)
def _zstd_block_c(src, i, e, dst, o, end, ctx):
    """One zstd frame ``src[i:e]`` decoded into exactly ``dst[o:end]`` by the system's libzstd
    with the context ``ctx``: False when it is damaged or does not fill it exactly."""
    if e - i <= 0:
        return False
    got = native_codecs.zstd_decompress_dctx(
        ctx,
        np.intp(dst.ctypes.data) + o,
        np.uintp(end - o),
        np.intp(src.ctypes.data) + i,
        np.uintp(e - i),
    )
    return native_codecs.zstd_is_error(got) == 0 and np.int64(got) == end - o


@njit(nogil=True, cache=True)
def _bitshuffle_into(src, size, codec, block, out, ctx):
    """``out`` (uint8: the chunk's bytes) from the bitshuffle chunk ``src``; False when it
    cannot be proved right. See ``_bitshuffle_decode``. ``codec``: 0 for none, 1 for LZ4
    blocks decoded in Numba, 2 for LZ4 blocks decoded by the system's liblz4, 3 for zstd
    blocks decoded by the system's libzstd with the context ``ctx`` (an address)."""
    nbytes = out.size
    n = nbytes // size
    if n * size != nbytes:
        return False
    pos = 0
    if codec:
        if src.size < 12 or _big_endian(src, 0, 8) != nbytes:
            return False
        block_bytes = _big_endian(src, 8, 4)
        block = block_bytes // size
        if block <= 0 or block % 8 != 0 or block * size != block_bytes:
            return False
        pos = 12
    scratch = np.empty(block * size if codec else 0, np.uint8)
    done = 0
    while n - done >= 8:
        m = min(block, n - done)
        m -= m % 8
        want = m * size
        part = out[done * size : (done + m) * size]
        if codec:
            if pos + 4 > src.size:
                return False
            stored = _big_endian(src, pos, 4)
            pos += 4
            if stored <= 0 or pos + stored > src.size:
                return False
            if codec == 3:
                if not _zstd_block_c(src, pos, pos + stored, scratch, 0, want, ctx):
                    return False
            elif codec == 2:
                if not _lz4_block_c(src, pos, pos + stored, scratch, 0, want):
                    return False
            elif not _lz4_block_into(src, pos, pos + stored, scratch, 0, want):
                return False
            pos += stored
            _bit_unshuffle(scratch, m, size, part)
        else:
            if pos + want > src.size:
                return False
            _bit_unshuffle(src[pos : pos + want], m, size, part)
            pos += want
        done += m
    if pos + (n - done) * size != src.size:
        return False
    out[done * size :] = src[pos:]
    return True


def _bitshuffle_decode(
    buf, nbytes: int, values, into: np.ndarray | None = None
) -> np.ndarray | None:
    """A bitshuffle chunk (HDF5 filter 32008, as hdf5plugin's H5Zbitshuffle.c writes it)
    holding exactly ``nbytes`` bytes, or None. The elements go in blocks (a multiple of 8 each,
    the last cut down to one), each bit-transposed and, with LZ4 or zstd, stored as a
    big-endian 4-byte size and an LZ4 block or a zstd frame after a header (big-endian 8-byte
    size, 4-byte block bytes); the few elements after the last block are stored as they are.
    One Numba call decodes the chunk without the GIL, into ``into`` when given."""
    size, codec = values[2], values[4]
    block = values[3] or max(128, 8192 // size // 8 * 8)  # bitshuffle's default
    out = np.empty(nbytes, dtype=np.uint8) if into is None else into
    src = np.frombuffer(buf, dtype=np.uint8)
    if codec == BSHUF_ZSTD:
        with native_codecs.zstd_context() as ctx:
            if ctx is None:  # pragma: no cover - out of memory
                return None
            return out if _bitshuffle_into(src, size, 3, block, out, ctx) else None
    lz4 = (2 if _NATIVE_LZ4_BLOCKS else 1) if codec == BSHUF_LZ4 else 0
    return out if _bitshuffle_into(src, size, lz4, block, out, 0) else None


def _lz4_block(data, want: int) -> bytes | None:
    """One raw LZ4 block decompressing to exactly ``want`` bytes, or None."""
    try:
        out = _LZ4.decompress(data, uncompressed_size=want)
    except _LZ4.LZ4BlockError:
        return None
    return out if len(out) == want else None


class Scratch:
    """Byte buffers one thread keeps from chunk to chunk: the stored chunk as read, and the
    outputs of decoding stages. A fresh buffer of a chunk's size per chunk is an ``mmap`` that
    glibc unmaps on ``free``, so its pages fault in again for every chunk, and a rank's threads
    fault in one address space (two threads decoded LZ4 chunks slower than one that way)."""

    __slots__ = ("_bufs",)

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def take(self, key: str, n: int) -> np.ndarray:
        """``n`` bytes (uint8) of the buffer ``key``, grown when it is shorter."""
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            buf = self._bufs[key] = np.empty(n, dtype=np.uint8)
        return buf[:n]

    def stage(self, n: int, busy) -> np.ndarray:
        """``n`` bytes for a stage's output that are not its input ``busy``."""
        first = self.take("a", n)
        if isinstance(busy, np.ndarray) and np.may_share_memory(first, busy):
            return self.take("b", n)
        return first


def decode(
    raw: bytes | np.ndarray,
    filters,
    nbytes: int,
    itemsize: int,
    mask: int = 0,
    into: np.ndarray | None = None,
    threads: int = 1,
    scratch: Scratch | None = None,
) -> np.ndarray | None:
    """The ``nbytes`` bytes (uint8) of one chunk stored as ``raw`` through ``filters`` (pipeline
    order; undone in reverse), or None when they cannot be proved right (h5py then reads it).

    ``mask``: the chunk's filter mask; bit i set means filter i was skipped when it was written
    (HDF5 skips it when reading too). Every compressor's output is exactly ``nbytes``, as
    ``layout`` admits one compressor at most and the other filters keep sizes.

    ``into``: ``nbytes`` bytes (uint8) where the chunk's rows go (ignored at any other size). A
    last stage that can write there (shuffle, bitshuffle, Blosc, Blosc2) does, and ``into`` is
    returned: no copy. Its bytes are undefined when None is returned. ``threads``: Blosc2's own
    threads for the chunk (it holds the GIL, so the rank's threads cannot share its work out).

    ``scratch``: the calling thread's buffers. Stages that can write into a buffer (LZF, zstd
    and LZ4 through the system's libraries, Blosc, Blosc2, bitshuffle, shuffle) then write
    there, and the result may be one of them: valid until the thread's next ``decode``.
    """
    if mask >> len(filters):
        return None  # a bit for a filter the pipeline does not have
    buf: bytes | np.ndarray = raw
    if into is not None and (into.size != nbytes or not into.flags.c_contiguous):
        into = None
    last = min((i for i in range(len(filters)) if not mask >> i & 1), default=-1)
    for i in range(len(filters) - 1, -1, -1):
        fid = filters[i][0]
        if mask >> i & 1:
            continue
        dst = into if i == last else None  # the last stage may write the rows themselves
        if dst is None and scratch is not None:
            dst = scratch.stage(nbytes, buf)
        if fid == FLETCHER32:
            if len(buf) < 4:
                return None
            body = _as_bytes_array(buf)
            stored = int.from_bytes(bytes(body[-4:]), "little")
            body = body[:-4]
            if int(_fletcher32(body)) != stored:
                return None
            buf = body
        elif fid == DEFLATE:
            if _NATIVE_DEFLATE:
                out = dst if dst is not None else np.empty(nbytes, dtype=np.uint8)
                if not native_codecs.zlib_stream_into(_as_bytes_array(buf), out):
                    return None
                buf = out
            else:
                try:
                    buf = zlib.decompress(buf, bufsize=nbytes)
                except zlib.error:
                    return None
        elif fid == BZIP2:
            buf = _bz2_decode(buf, nbytes)
            if buf is None:
                return None
        elif fid == LZF:
            buf = lzf.decompress(buf, nbytes, dst)
            if buf is None:
                return None
        elif fid == ZSTD and ZSTD in FILTERS:
            buf = _zstd_decode(buf, nbytes, dst)
            if buf is None:
                return None
        elif fid == LZ4 and LZ4 in FILTERS:
            buf = _lz4_decode(buf, nbytes, dst)
            if buf is None:
                return None
        elif fid == BITSHUFFLE and filters[i][1][4] in BSHUF_CODECS:
            buf = _bitshuffle_decode(buf, nbytes, filters[i][1], dst)
            if buf is None:
                return None
        elif fid == BLOSC2 and _BLOSC2 is not None:
            buf = _blosc2_decode(buf, nbytes, dst, threads)
            if buf is None:
                return None
        elif fid == BLOSC and _BLOSC is not None:
            buf = _blosc_decode(buf, nbytes, dst)
            if buf is None:
                return None
        elif fid in DECODE_INTO and fid in FILTERS:
            out = dst if dst is not None else np.empty(nbytes, dtype=np.uint8)
            if not DECODE_INTO[fid](_as_bytes_array(buf), filters[i][1], out):
                return None
            buf = out
        elif fid == SHUFFLE:
            if len(buf) != nbytes:
                return None
            if itemsize > 1 and nbytes > itemsize:
                to = dst if dst is not None else np.empty(nbytes, dtype=np.uint8)
                buf = _unshuffle(_as_bytes_array(buf), itemsize, to)
        else:  # pragma: no cover - ``layout`` admits no other filter
            return None
    if len(buf) != nbytes:
        return None
    return np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf


def _pread_into(fd: int, path: str, view: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(view):
        got = os.preadv(fd, [view[pos:]], offset + pos)
        if got == 0:
            raise DataError(f"'{path}' ends before the data it describes (truncated file?)")
        pos += got


RUN_BYTES = 8 << 20  # decoded bytes of consecutive chunks one thread takes at a time


def task_runs(tasks: list, chunk_bytes: int, threads: int) -> list[list]:
    """``tasks`` (in row order) cut into runs of consecutive chunks, about ``RUN_BYTES`` of
    decoded rows each and at least two runs a thread, handed out to the threads in turn.

    Each thread then writes its own stretch of the rows. With one chunk a task the two threads
    wrote alternate megabytes of the new rows, first touching their pages side by side (one
    page-table lock covers 2 MiB): runs read the bench's 128 MiB files 1.27-1.33x as fast on
    two threads (unfiltered, LZ4, Blosc; lzf 1.16x, gzip 1.06x), alternating in one process
    on a 2-core AMD EPYC guest, and the same on one thread."""
    per = max(1, RUN_BYTES // max(1, chunk_bytes))
    per = max(1, min(per, len(tasks) // (2 * threads)))
    return [tasks[i : i + per] for i in range(0, len(tasks), per)]


def read_rows(
    path: str,
    name: str,
    lay: ChunkLayout,
    start: int,
    stop: int,
    out: np.ndarray,
    threads: int,
    identity: tuple[int, int, int, int] | None = None,
    flags: np.ndarray | None = None,
) -> None:
    """Fill ``out`` (rows x columns, C order, the read type) with rows ``[start, stop)`` of the
    chunked data set ``name`` of ``path``, one task per chunk on ``threads`` threads.

    ``flags`` (float ``out``): set True for each row holding NaN or Inf (rows already set stay
    set); when chunks span whole rows each task screens its rows while they are in cache.

    The chunk index is read here, for this rank's chunks only (by coordinate: one B-tree lookup
    each). ``identity`` (``file_identity`` of the inspected file): the file read must be it.
    """
    m = stop - start
    if m <= 0:
        return
    n, w, cr, cc = lay.rows_cols
    stored = np.dtype(lay.dtype)
    isz = stored.itemsize
    nbytes = cr * cc * isz
    if out.shape != (m, w) or not out.flags.c_contiguous:
        raise ValueError(f"read_rows: out has shape {out.shape}, needs ({m}, {w}) C order")
    ids = [f for f, _ in lay.filters]
    checked = {f for f, v in lay.filters if f in CHECKED and not (f == BITSHUFFLE and not v[4])}
    direct_rows = not lay.filters and cc == w and stored == out.dtype
    screen_tasks = flags is not None and cc == w  # a task's rows are then complete
    screened_reads = direct_rows and screen_tasks and native.supported()[0]
    step = max(1, SCREEN_READ_BYTES // (w * isz))
    zero = out.dtype.type(0)
    fd = os.open(path, os.O_RDONLY)
    try:
        if identity is not None:
            compare_identity(path, identity, os.fstat(fd))
        tasks, slow = [], []
        try:
            with h5py.File(path, "r") as fh:
                sid = fh[name].id
                for r0 in range((start // cr) * cr, stop, cr):
                    for c0 in range(0, w, cc):
                        coord = (r0, c0) if len(lay.shape) == 2 else (r0,)
                        info = sid.get_chunk_info_by_coord(coord)
                        partial = r0 + cr > n or c0 + cc > w
                        mask = int(info.filter_mask)
                        task = (r0, c0, info.byte_offset, info.size, mask)
                        applied = {f for i, f in enumerate(ids) if not mask >> i & 1}
                        if (
                            info.byte_offset is None
                            or mask >> len(ids)
                            or (not lay.filters and info.size != nbytes)
                            or (partial and applied and not applied & checked)
                        ):
                            slow.append(task)
                        else:
                            tasks.append(task)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"'{path}:{name}' cannot be read ({exc})") from None
        if identity is not None:  # the file h5py opened by name is still the one inspected
            compare_identity(path, identity, os.stat(path))

        def read(task) -> tuple | None:
            if screened_reads:  # preads of 256 KiB from Numba, each screened while in L2
                lo, hi = max(start, task[0]), min(stop, task[0] + cr)
                base = task[2] + (start - task[0]) * w * isz  # where row 0 of ``out`` would be
                done = _read_screened(fd, base, out, lo - start, hi - start, step, flags, zero)
                if done == hi - start:
                    return None
            left = _read_chunk(task)  # (after a failed screened read: again, for the error)
            if left is None and screen_tasks:
                lo, hi = max(start, task[0]), min(stop, task[0] + cr)
                _screen_piece(out, lo - start, hi - start, flags, zero)
            return left

        local = threading.local()  # each thread's Scratch, for this call's chunks

        def _read_chunk(task) -> tuple | None:
            r0, c0, offset, size, mask = task
            scratch = getattr(local, "scratch", None)
            if scratch is None:
                scratch = local.scratch = Scratch()
            lo, hi = max(start, r0), min(stop, r0 + cr)
            c1 = min(w, c0 + cc)
            if direct_rows:  # the rows are one run of bytes in the chunk and in ``out``
                flat = out[lo - start : hi - start].reshape(-1).view(np.uint8)
                _pread_into(fd, path, memoryview(flat), offset + (lo - r0) * cc * isz)
                return None
            if not lay.filters:  # only the chunk's rows this rank needs
                raw = scratch.take("raw", (hi - lo) * cc * isz)
                _pread_into(fd, path, memoryview(raw), offset + (lo - r0) * cc * isz)
                part = raw.view(stored).reshape(hi - lo, cc)
                out[lo - start : hi - start, c0:c1] = part[:, : c1 - c0]
                return None
            raw = scratch.take("raw", size + 64)[:size]  # bytes after it: zfp reads words
            _pread_into(fd, path, memoryview(raw), offset)
            # whole rows of a whole chunk, stored in the read type: decoded in place if it can
            into = None
            if cc == w and stored == out.dtype and start <= r0 and r0 + cr <= min(stop, n):
                into = out[r0 - start : r0 + cr - start].reshape(-1).view(np.uint8)
            data = decode(raw, lay.filters, nbytes, isz, mask, into, threads, scratch)
            if data is None:
                return task
            if data is into:
                return None
            part = data.view(stored).reshape(cr, cc)
            out[lo - start : hi - start, c0:c1] = part[lo - r0 : hi - r0, : c1 - c0]
            return None

        def read_run(run: list) -> list:
            return [t for t in map(read, run) if t is not None]

        try:
            if threads > 1 and len(tasks) > 1:
                runs = task_runs(tasks, nbytes, threads)
                with ThreadPoolExecutor(min(threads, len(runs))) as pool:
                    for left in pool.map(read_run, runs):
                        slow += left
            else:
                slow += read_run(tasks)
        except OSError as exc:  # an I/O error of the file system: one line, on every rank
            raise DataError(f"'{path}:{name}' cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if slow:
        _read_with_h5py(path, name, lay, start, stop, out, slow)
    if flags is not None and (not screen_tasks or slow):
        nonfinite_rows(out, out=flags)


def _read_with_h5py(path, name, lay: ChunkLayout, start, stop, out, tasks) -> None:
    """The chunks ``tasks`` through h5py (fill values, skipped filters, anything unproved)."""
    _n, w, cr, cc = lay.rows_cols
    try:
        with h5py.File(path, "r") as fh:
            dset = fh[name]
            for r0, c0, *_ in tasks:
                lo, hi = max(start, r0), min(stop, r0 + cr)
                c1 = min(w, c0 + cc)
                sel = np.s_[lo:hi, c0:c1] if len(lay.shape) == 2 else np.s_[lo:hi]
                out[lo - start : hi - start, c0:c1] = dset[sel].reshape(hi - lo, c1 - c0)
    except (OSError, KeyError, ValueError) as exc:  # e.g. a checksum that does not match
        raise DataError(f"'{path}:{name}' cannot be read ({exc})") from None

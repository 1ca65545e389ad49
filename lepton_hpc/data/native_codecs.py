"""LZ4 blocks, zstd frames and zlib streams decoded straight into a caller's buffer by the
system's liblz4, libzstd and libdeflate, called through ``ctypes`` (which lets go of the GIL for
the call).

Why not the ``lz4``, ``zstandard`` and ``zlib`` modules alone: each of their calls returns a new
bytes object of the chunk's size. At 1 MiB that is an ``mmap`` that glibc gives back on ``free``, so
every chunk faults its output in page by page again (a third of the decode time on one thread),
and a rank's threads fault in one address space, where the kernel serialises part of that work:
two threads decoded LZ4 chunks slower than one. Decoding into buffers the threads keep from
chunk to chunk has no faults at all. libdeflate also inflates HDF5's deflate (gzip) chunks
1.6-1.7x as fast as zlib (0.54-0.59 against 0.32-0.35 GB/s on this project's machine).

The libraries are Debian's (``liblz4-1`` and ``libzstd1`` are on every Debian and Red Hat
system; ``make install`` adds ``libdeflate0``); where one cannot be loaded it is not available
and the reader uses the package instead (``chunk_read``). The decoders are the libraries' safe
ones: they never read past the input or write past the output, and report damaged input.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import llvmlite.binding as llvm
import numpy as np
from numba import types

_INT_MAX = 2**31 - 1


def _load(*names: str):
    for name in names:  # dlopen by soname: no ``ldconfig`` subprocess (not in an MPI process)
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


_liblz4 = _load("liblz4.so.1", "liblz4.so", "liblz4.dylib")
_libzstd = _load("libzstd.so.1", "libzstd.so", "libzstd.dylib")
_libdeflate = _load("libdeflate.so.0", "libdeflate.so", "libdeflate.dylib")

_lz4_safe = None
if _liblz4 is not None:
    try:
        _lz4_safe = _liblz4.LZ4_decompress_safe
        _lz4_safe.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        _lz4_safe.restype = ctypes.c_int
    except AttributeError:  # pragma: no cover - a liblz4 without the function
        _lz4_safe = None

_zstd = None
if _libzstd is not None:
    try:
        _zstd = {
            name: getattr(_libzstd, name)
            for name in (
                "ZSTD_getFrameContentSize",
                "ZSTD_findFrameCompressedSize",
                "ZSTD_decompressDCtx",
                "ZSTD_isError",
                "ZSTD_createDCtx",
            )
        }
    except AttributeError:  # pragma: no cover - a libzstd older than 1.3
        _zstd = None
if _zstd is not None:
    _zstd["ZSTD_getFrameContentSize"].argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    _zstd["ZSTD_getFrameContentSize"].restype = ctypes.c_ulonglong
    _zstd["ZSTD_findFrameCompressedSize"].argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    _zstd["ZSTD_findFrameCompressedSize"].restype = ctypes.c_size_t
    _zstd["ZSTD_decompressDCtx"].argtypes = (ctypes.c_void_p,) + (
        ctypes.c_void_p,
        ctypes.c_size_t,
    ) * 2
    _zstd["ZSTD_decompressDCtx"].restype = ctypes.c_size_t
    _zstd["ZSTD_isError"].argtypes = (ctypes.c_size_t,)
    _zstd["ZSTD_isError"].restype = ctypes.c_uint
    _zstd["ZSTD_createDCtx"].argtypes = ()
    _zstd["ZSTD_createDCtx"].restype = ctypes.c_void_p

_inflate = None
if _libdeflate is not None:
    try:
        _inflate = _libdeflate.libdeflate_zlib_decompress
        _inflate.argtypes = (
            (ctypes.c_void_p,) + (ctypes.c_void_p, ctypes.c_size_t) * 2 + (ctypes.c_void_p,)
        )
        _inflate.restype = ctypes.c_int
        _new_inflater = _libdeflate.libdeflate_alloc_decompressor
        _new_inflater.argtypes = ()
        _new_inflater.restype = ctypes.c_void_p
    except AttributeError:  # pragma: no cover - a libdeflate without zlib streams
        _inflate = None


class _Contexts:
    """Decompression contexts kept for reuse, one per thread decoding at a time (a context is
    not shared by two threads): a new one per chunk would be an allocation of 100-200 KiB and
    its page faults per chunk. Never freed: there are at most as many as threads ever decoded
    at once."""

    def __init__(self, create) -> None:
        self._create, self._free, self._lock = create, [], threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._create() or None  # NULL: out of memory

    def give(self, ctx: int) -> None:
        with self._lock:
            self._free.append(ctx)


def _bind(name: str, real, restype, *argtypes, refused=None) -> bool:
    """Bind the symbol ``name`` for Numba code to the library's function ``real``, or, when
    that is None, to a stand-in of the C type ``restype(*argtypes)`` returning ``refused``;
    whether the real one is bound. Compiled code names the symbol, which LLVM resolves in this
    process when the code is made or loaded from Numba's cache."""
    found = real is not None
    if not found:
        real = _STAND_INS[name] = ctypes.CFUNCTYPE(restype, *argtypes)(lambda *_: refused)
    llvm.add_symbol(name, ctypes.cast(real, ctypes.c_void_p).value)
    return found


_STAND_INS: dict = {}  # kept alive: LLVM holds only their addresses

# liblz4's block decoder for Numba code (bitshuffle's blocks, ``chunk_read``). Without liblz4
# the stand-in refuses every block, and the callers use their Numba decoder instead
# (``LZ4_IN_NUMBA`` False).
_P, _INT, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
LZ4_IN_NUMBA = _bind("LZ4_decompress_safe", _lz4_safe, _INT, _P, _P, _INT, _INT, refused=-1)
# LZ4_decompress_safe(src, dst, compressed bytes, dst capacity): bytes written, or < 0
lz4_decompress_safe = types.ExternalFunction(
    "LZ4_decompress_safe", types.int32(types.intp, types.intp, types.int32, types.int32)
)

# libzstd's frame decoder for Numba code (bitshuffle's zstd blocks), bound the same way; the
# stand-ins report an error for every frame (``ZSTD_IN_NUMBA`` False: callers do not use them).
_ZSTD_ERROR = 2**64 - 1  # (size_t)-1, an error code
ZSTD_IN_NUMBA = _bind(
    "ZSTD_decompressDCtx",
    None if _zstd is None else _zstd["ZSTD_decompressDCtx"],
    *(_SIZE, _P, _P, _SIZE, _P, _SIZE),
    refused=_ZSTD_ERROR,
)
_bind(
    "ZSTD_isError",
    None if _zstd is None else _zstd["ZSTD_isError"],
    ctypes.c_uint,
    _SIZE,
    refused=1,
)
# ZSTD_decompressDCtx(context, dst, dst capacity, src, src bytes): bytes written, or an error
# code (ZSTD_isError(code) != 0)
zstd_decompress_dctx = types.ExternalFunction(
    "ZSTD_decompressDCtx",
    types.uintp(types.intp, types.intp, types.uintp, types.intp, types.uintp),
)
zstd_is_error = types.ExternalFunction("ZSTD_isError", types.uint32(types.uintp))

_zstd_contexts = _Contexts(_zstd["ZSTD_createDCtx"]) if _zstd is not None else None
_inflaters = _Contexts(_new_inflater) if _inflate is not None else None


@contextlib.contextmanager
def _borrowed(pool: _Contexts):
    """A context of ``pool`` (its address) this thread may use until the block ends, or None
    when none can be made (out of memory)."""
    ctx = pool.take()
    try:
        yield ctx
    finally:
        if ctx is not None:
            pool.give(ctx)


def zstd_context():
    """A zstd decompression context for a ``with`` block (``_borrowed``)."""
    return _borrowed(_zstd_contexts)


def lz4_available() -> bool:
    return _lz4_safe is not None


def zstd_available() -> bool:
    return _zstd is not None


def deflate_available() -> bool:
    return _inflate is not None


def _address(buf: np.ndarray) -> int:
    return buf.__array_interface__["data"][0]


def lz4_block_into(src: np.ndarray, dst: np.ndarray) -> bool:
    """The raw LZ4 block ``src`` (uint8, contiguous) decoded into all of ``dst`` (uint8,
    contiguous): False when it is damaged or does not decode to exactly ``dst.size`` bytes."""
    if src.size == 0 or src.size > _INT_MAX or dst.size > _INT_MAX:
        return False
    got = _lz4_safe(_address(src), _address(dst), src.size, dst.size)
    return got == dst.size


def zstd_frame_into(src: np.ndarray, dst: np.ndarray) -> bool:
    """One zstd frame filling ``src`` exactly (uint8, contiguous), whose header gives its content
    size as ``dst.size``, decoded into ``dst``: False otherwise, or when it is damaged."""
    fn = _zstd
    ptr, n = _address(src), src.size
    if n == 0 or fn["ZSTD_getFrameContentSize"](ptr, n) != dst.size:
        return False  # no size in the header (HDF5's filter cannot size its output either)
    if fn["ZSTD_findFrameCompressedSize"](ptr, n) != n:
        return False  # bytes after the frame, or a frame cut short (an error code is not n)
    with _borrowed(_zstd_contexts) as dctx:
        if dctx is None:  # pragma: no cover - out of memory
            return False
        got = fn["ZSTD_decompressDCtx"](dctx, _address(dst), dst.size, ptr, n)
    return not fn["ZSTD_isError"](got) and got == dst.size


def zlib_stream_into(src: np.ndarray, dst: np.ndarray) -> bool:
    """One zlib stream (HDF5's deflate filter) at the start of ``src`` (uint8, contiguous)
    inflated into all of ``dst``: False when it is damaged (its Adler-32 included) or does not
    inflate to exactly ``dst.size`` bytes. Bytes after the stream are ignored, as HDF5's filter
    and ``zlib.decompress`` ignore them."""
    if src.size == 0:
        return False
    with _borrowed(_inflaters) as ctx:
        if ctx is None:  # pragma: no cover - out of memory
            return False
        # NULL for the output size: success means exactly dst.size bytes
        got = _inflate(ctx, _address(src), src.size, _address(dst), dst.size, None)
    return got == 0  # LIBDEFLATE_SUCCESS

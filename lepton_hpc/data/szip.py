"""Szip chunks (HDF5 filter 4) decoded on the rank's threads by the system's ``libsz`` (libaec's
szip interface: the library HDF5's own szip filter calls), through ``ctypes``, which lets go of
the GIL for each call.

Why not through HDF5: h5py holds the GIL while HDF5 decodes a chunk, so a rank decodes on one
core. HDF5's filter (``H5Z__filter_szip``) does nothing but what ``decode_into`` does: the chunk
starts with the decoded size (4 bytes, little-endian), and the rest goes to
``SZ_BufftoBuffDecompress`` with the data set's four filter values (options mask, pixels per
block, bits per pixel, pixels per scanline, in HDF5's order). The same function with the same
arguments gives HDF5's bytes bit for bit. libaec's decoder keeps no state between calls, so
threads may call it at once.

Szip streams carry no checksum: a damaged chunk that still decodes to the right size gives other
values, as it does through HDF5. A chunk whose stored or decoded size is not the chunk's is
refused (``read_rows`` then leaves it to h5py, which gives HDF5's answer or error).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

SZ_OK = 0
_NAMES = ("libsz.so.2", "libsz.so")  # Debian's libaec (HDF5's own szip library)


class _Param(ctypes.Structure):
    """szlib.h's ``SZ_com_t``."""

    _fields_ = [
        ("options_mask", ctypes.c_int),
        ("bits_per_pixel", ctypes.c_int),
        ("pixels_per_block", ctypes.c_int),
        ("pixels_per_scanline", ctypes.c_int),
    ]


def _library():
    """The szip library with ``SZ_BufftoBuffDecompress`` typed, or None."""
    found = ctypes.util.find_library("sz")
    for name in (*_NAMES, *([found] if found else [])):
        try:
            lib = ctypes.CDLL(name)
            fn = lib.SZ_BufftoBuffDecompress
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.POINTER(_Param),
        )
        return lib
    return None


_LIB = _library()


def available() -> bool:
    return _LIB is not None


def decode_into(src: np.ndarray, values: tuple[int, ...], dst: np.ndarray) -> bool:
    """The szip chunk ``src`` (uint8, contiguous, the stored bytes) decoded into all of ``dst``
    (uint8, contiguous, writable): False when the filter values are not HDF5's four, the size
    the chunk names is not ``dst.size``, or libsz fails or decodes another size."""
    if _LIB is None or len(values) != 4 or src.size < 4 or dst.size == 0:
        return False
    if int.from_bytes(src[:4].tobytes(), "little") != dst.size:
        return False
    if any(not 0 <= v < 2**31 for v in values):
        return False
    mask, per_block, bits, per_line = values
    param = _Param(mask, bits, per_block, per_line)
    size = ctypes.c_size_t(dst.size)
    status = _LIB.SZ_BufftoBuffDecompress(
        dst.ctypes.data, ctypes.byref(size), src.ctypes.data + 4, src.size - 4, param
    )
    return status == SZ_OK and size.value == dst.size

"""ZFP chunks (HDF5 filter 32013, H5Z-ZFP as ``hdf5plugin`` ships it) decoded on the rank's
threads by the zfp library inside hdf5plugin's plugin, called through ``ctypes`` (which lets go
of the GIL for each call) without HDF5.

Why not through HDF5: h5py holds the GIL and HDF5 its global lock while a chunk is decoded, so
a rank decodes on one core. And why not the plugin's filter function itself: on damaged input
(and for files written on a big-endian machine) it calls HDF5 (``H5Epush``, ``H5Tconvert``),
which must not run on two threads at once. Here only zfp's own functions run on the threads:
the same code the filter runs, so the bytes are HDF5's bit for bit.

H5Z-ZFP keeps what decoding needs in the data set's filter values: the first is the versions
(H5Z-ZFP's, zfp's library and codec), the rest a zfp header (field type and dimensions, the
stream's mode). ``parse`` reads them once per data set; ``decode_into`` decodes one chunk (a
bare zfp stream) into the caller's buffer. A data set this cannot prove right (header written
on a big-endian machine, a codec newer than the library's, an unknown field type) is left to
HDF5, which decodes it or gives its error.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

ZFP_HEADER_FULL = 0x7  # magic, field meta data and stream mode
_SIZES = {1: 4, 2: 8, 3: 4, 4: 8}  # zfp_type int32, int64, float, double: bytes an element


def _library():
    """hdf5plugin's ZFP plugin (``libh5zfp``) with zfp's functions typed, or None."""
    try:
        import hdf5plugin
    except Exception:  # noqa: BLE001 - not installed, or broken (plugins.load says which)
        return None
    found = sorted(Path(hdf5plugin.PLUGIN_PATH).glob("libh5zfp.*"))
    if not found:
        return None
    try:
        lib = ctypes.CDLL(str(found[0]))
        p, sz, u64, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
        for name, res, args in (
            ("stream_open", p, (p, sz)),
            ("stream_close", None, (p,)),
            ("zfp_stream_open", p, (p,)),
            ("zfp_stream_close", None, (p,)),
            ("zfp_field_alloc", p, ()),
            ("zfp_field_free", None, (p,)),
            ("zfp_read_header", sz, (p, p, ctypes.c_uint)),
            ("zfp_stream_mode", u64, (p,)),
            ("zfp_field_metadata", u64, (p,)),
            ("zfp_field_set_metadata", i, (p, u64)),
            ("zfp_field_size", sz, (p, p)),
            ("zfp_field_type", i, (p,)),
            ("zfp_field_set_pointer", None, (p, p)),
            ("zfp_stream_set_mode", i, (p, u64)),
            ("zfp_decompress", sz, (p, p)),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        lib.reader_codec = ctypes.c_uint.in_dll(lib, "zfp_codec_version").value
    except (OSError, AttributeError, ValueError):
        return None
    return lib


_LIB = _library()


def available() -> bool:
    return _LIB is not None


def _codec_too_new(values: tuple[int, ...], reader_codec: int) -> bool:
    """Whether the chunks were written by a zfp codec newer than the library's (H5Z-ZFP's own
    test: for its versions before 0.1.1 the codec is inferred from zfp's version)."""
    h5zzfp, codec, zfpver = values[0] & 0xFFF, (values[0] >> 12) & 0xF, values[0] >> 16
    if h5zzfp < 0x0110:
        zfpver <<= 4
        if zfpver < 0x0500:
            codec = 4
        elif zfpver < 0x1000:
            codec = (zfpver & 0x0F00) >> 8
        else:
            codec = 5
    return codec > reader_codec


def _close(lib, field, zs, bits) -> None:
    """Free what ``parse`` or ``decode_into`` opened (None: not opened)."""
    if field:
        lib.zfp_field_free(field)
    if zs:
        lib.zfp_stream_close(zs)
    if bits:
        lib.stream_close(bits)


@functools.lru_cache(maxsize=64)
def parse(values: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(stream mode, field meta data, decoded bytes of a chunk) from a ZFP data set's filter
    values, or None when its chunks are left to HDF5."""
    lib = _LIB
    if lib is None or len(values) < 2 or _codec_too_new(values, lib.reader_codec):
        return None
    header = np.zeros(len(values) - 1 + 4, dtype="<u4")  # zeros after it: zfp reads words
    header[: len(values) - 1] = values[1:]
    bits = lib.stream_open(header.ctypes.data, 4 * (len(values) - 1))
    zs = lib.zfp_stream_open(bits) if bits else None
    field = lib.zfp_field_alloc()
    try:
        if not (zs and field and lib.zfp_read_header(zs, field, ZFP_HEADER_FULL)):
            return None  # e.g. a header written on a big-endian machine: HDF5 swaps it
        size = _SIZES.get(lib.zfp_field_type(field))
        if size is None:
            return None
        n = lib.zfp_field_size(field, None) * size
        return lib.zfp_stream_mode(zs), lib.zfp_field_metadata(field), n
    finally:
        _close(lib, field, zs, bits)


def decode_into(src: np.ndarray, values: tuple[int, ...], dst: np.ndarray) -> bool:
    """The ZFP chunk ``src`` (uint8, contiguous, the stored bytes) decoded into all of ``dst``
    (uint8, contiguous): False when the data set's chunks are not ``dst.size`` bytes or zfp
    reports a failure or having read past the stream. zfp checks nothing in the stream
    (neither does the filter): a damaged chunk decodes to other values, as it does through
    HDF5, and zfp may read past the stream's end before it stops (as it reads past HDF5's
    buffer): ``src`` should be a view of a buffer with some bytes after it (``read_rows``
    leaves 64).
    """
    lib, info = _LIB, parse(values)
    if info is None or info[2] != dst.size or src.size == 0:
        return False
    mode, meta, _ = info
    field = lib.zfp_field_alloc()
    bits = lib.stream_open(src.ctypes.data, src.size)
    zs = lib.zfp_stream_open(bits) if bits else None
    try:
        if not (field and zs and lib.zfp_field_set_metadata(field, meta)):
            return False
        lib.zfp_field_set_pointer(field, dst.ctypes.data)
        lib.zfp_stream_set_mode(zs, mode)
        used = lib.zfp_decompress(zs, field)
        return 0 < used <= src.size  # bytes read, in whole 64-bit words: as written
    finally:
        _close(lib, field, zs, bits)

"""hdf5plugin's SZ, SZ3, SPERR, FCIDecomp and HTJ2K chunks decoded on the rank's threads by the
plugin's own filter function, called through ``ctypes`` (which lets go of the GIL for the call)
from a second, private instance of the plugin library that HDF5 never uses.

Why not the instance HDF5 uses: hdf5plugin's plugins reach HDF5 through a table of function
pointers that ``hdf5plugin`` fills when it registers them (``init_filter``). On damaged input
their filter functions call ``H5Epush``, and HDF5 must not run on two threads at once. A
second instance, loaded with ``dlmopen`` into a link namespace of its own, has its own table,
never filled: there every HDF5 function is hdf5plugin's no-op stand-in, so a failing chunk just
returns 0 (failure) and never touches HDF5. The filter function is the one HDF5 would call,
with the chunk's stored bytes and the data set's filter values, so a chunk it decodes has
HDF5's bits. Its output buffer comes from the namespace's own ``malloc``, so it is freed by the
namespace's ``free``.

SZ (32017) keeps its decoding parameters in globals, so two threads must not share an
instance: each of its instances (each ``dlmopen`` is a new one, with its own globals) serves
one thread at a time, and a rank loads more of them, up to ``MAX_INSTANCES``, while all are
busy. None of these streams carries a checksum: a damaged
chunk decodes as it would through HDF5 (or makes the codec fail, and then h5py reads the chunk
and names the data set in its error). A chunk the filter decodes to another size than the
chunk's is refused.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np

# filter id -> hdf5plugin's library name (``libh5<name>.so``)
LIBRARIES = {32017: "sz", 32024: "sz3", 32028: "sperr", 32018: "fcidecomp", 32033: "htj2k"}
NAMES = {32017: "SZ", 32024: "SZ3", 32028: "SPERR", 32018: "FCIDecomp", 32033: "HTJ2K"}
# SZ keeps its decoding parameters in globals: each of its instances serves one thread at a
# time, and a busy rank loads up to MAX_INSTANCES of them (glibc allows 16 link namespaces).
SERIAL = frozenset({32017})
MAX_INSTANCES = 6
_REVERSE = 0x0100  # H5Z_FLAG_REVERSE: decode
_LM_ID_NEWLM = -1
_RTLD_NOW = 2
_FILTER = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.c_uint,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_uint),
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.POINTER(ctypes.c_void_p),
)
_MALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_INFO = ctypes.CFUNCTYPE(ctypes.c_void_p)


class _Class2(ctypes.Structure):
    """HDF5's ``H5Z_class2_t``: what a plugin's ``H5PLget_plugin_info`` returns."""

    _fields_ = [
        ("version", ctypes.c_int),
        ("id", ctypes.c_int),
        ("encoder_present", ctypes.c_uint),
        ("decoder_present", ctypes.c_uint),
        ("name", ctypes.c_char_p),
        ("can_apply", ctypes.c_void_p),
        ("set_local", ctypes.c_void_p),
        ("filter", ctypes.c_void_p),
    ]


class _Decoder:
    def __init__(self, filter_fn, malloc, free) -> None:
        self.filter, self.malloc, self.free = filter_fn, malloc, free


def _plugin_dir() -> Path | None:
    try:
        import hdf5plugin
    except Exception:  # noqa: BLE001 - not installed, or broken (plugins.load says which)
        return None
    return Path(hdf5plugin.PLUGIN_PATH)


def _library_path(fid: int) -> Path | None:
    """hdf5plugin's library of filter ``fid`` (``libh5<name>.so``), or None where it has none."""
    folder = _plugin_dir()
    if fid not in LIBRARIES or folder is None:
        return None
    path = folder / f"libh5{LIBRARIES[fid]}.so"
    return path if path.is_file() else None


def _load(fid: int) -> _Decoder | None:
    """A new private instance of filter ``fid``'s plugin, or None where it cannot be loaded."""
    path = _library_path(fid)
    if path is None:
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.dlmopen.restype, libc.dlmopen.argtypes = (
            ctypes.c_void_p,
            (ctypes.c_long, ctypes.c_char_p, ctypes.c_int),
        )
        libc.dlsym.restype, libc.dlsym.argtypes = (
            ctypes.c_void_p,
            (ctypes.c_void_p, ctypes.c_char_p),
        )
        handle = libc.dlmopen(_LM_ID_NEWLM, os.fsencode(path), _RTLD_NOW)
        if not handle:
            return None
        addrs = {
            n: libc.dlsym(handle, n.encode()) for n in ("H5PLget_plugin_info", "malloc", "free")
        }
        if not all(addrs.values()) or libc.dlsym(handle, b"init_filter") is None:
            return None  # not hdf5plugin's build (its HDF5 calls would be real ones)
        info = _INFO(addrs["H5PLget_plugin_info"])()
        if not info:
            return None
        cls = _Class2.from_address(info)
        if cls.version != 1 or cls.id != fid or not cls.decoder_present or not cls.filter:
            return None
        return _Decoder(_FILTER(cls.filter), _MALLOC(addrs["malloc"]), _FREE(addrs["free"]))
    except (OSError, AttributeError, ValueError):
        return None


class _Pool:
    """The private instances of one filter's plugin. A filter whose library keeps its state in
    globals (``SERIAL``) lends each instance to one thread at a time and loads another (up to
    ``MAX_INSTANCES``) when all are busy; the others share one instance."""

    def __init__(self, fid: int) -> None:
        self.fid = fid
        self.cond = threading.Condition()
        self.idle: list[_Decoder] = []
        self.loaded = 0
        self.cap = MAX_INSTANCES if fid in SERIAL else 1

    def acquire(self) -> _Decoder | None:
        with self.cond:
            while True:
                if self.idle:
                    dec = self.idle[-1]
                    if self.fid in SERIAL:
                        self.idle.pop()
                    return dec
                if self.loaded < self.cap:
                    dec = _load(self.fid)  # rare: under the lock, once per instance
                    if dec is not None:
                        self.loaded += 1
                        if self.fid not in SERIAL:
                            self.idle.append(dec)
                        return dec
                    self.cap = self.loaded  # no more namespaces: share what is loaded
                if self.loaded == 0:
                    return None
                self.cond.wait()

    def release(self, dec: _Decoder) -> None:
        if self.fid in SERIAL:
            with self.cond:
                self.idle.append(dec)
                self.cond.notify()


_POOLS = {fid: _Pool(fid) for fid in LIBRARIES}


def present(fid: int) -> bool:
    """Whether hdf5plugin ships filter ``fid``'s plugin (it is loaded at the first chunk)."""
    return _library_path(fid) is not None


def available(fid: int) -> bool:
    """Whether filter ``fid``'s private instance loads (it is loaded here if not yet)."""
    pool = _POOLS.get(fid)
    dec = pool.acquire() if pool is not None else None
    if dec is None:
        return False
    pool.release(dec)
    return True


def decode_into(fid: int, src: np.ndarray, values: tuple[int, ...], dst: np.ndarray) -> bool:
    """The chunk ``src`` (uint8, contiguous, the stored bytes) of filter ``fid`` decoded into
    all of ``dst`` (uint8, contiguous, writable): False when the plugin is not loaded, the
    filter fails, or it decodes another size than ``dst.size``."""
    pool = _POOLS.get(fid)
    if pool is None or src.size == 0:
        return False
    dec = pool.acquire()
    if dec is None:
        return False
    try:
        return _decode(dec, src, values, dst)
    finally:
        pool.release(dec)


def _decode(dec: _Decoder, src: np.ndarray, values: tuple[int, ...], dst: np.ndarray) -> bool:
    n = int(src.size)
    buf = dec.malloc(n)
    if not buf:
        return False
    ctypes.memmove(buf, src.ctypes.data, n)
    ptr, size = ctypes.c_void_p(buf), ctypes.c_size_t(n)
    cd = (ctypes.c_uint * max(1, len(values)))(*values)
    try:
        got = dec.filter(_REVERSE, len(values), cd, n, ctypes.byref(size), ctypes.byref(ptr))
        if got != dst.size or not ptr.value or size.value < got:
            return False
        ctypes.memmove(dst.ctypes.data, ptr.value, got)
        return True
    finally:
        if ptr.value:  # the filter's output (or our input, which it leaves on failure)
            dec.free(ptr.value)

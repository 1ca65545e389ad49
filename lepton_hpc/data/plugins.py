"""HDF5 filters from the optional ``hdf5plugin`` package, and one clear error when one is missing.

HDF5 decodes a filter only when a plugin for it is registered in the process. ``hdf5plugin``
registers its filters (Zstd, LZ4, Blosc, Blosc2, bitshuffle, bzip2, ZFP, SZ, ...) when it is
imported, so ``load`` imports it once per process, before any file is read: ``chunk_read``
calls it when it is imported, and ``data.reader`` (which every command that reads data sets
goes through, ``lepton inspect`` included) imports ``chunk_read``, on every rank. Without the
package a data set using such a filter stops at inspection with one line naming the file, the
data set, the filter and the package to install, not an HDF5 error stack from deep inside a read.
"""

from __future__ import annotations

import functools

import h5py

from ..errors import DataError

# The filters hdf5plugin provides (its *_ID constants), by HDF5 filter id.
PLUGIN_FILTERS = {
    307: "bzip2",
    32001: "blosc",
    32004: "lz4",
    32008: "bitshuffle",
    32013: "zfp",
    32015: "zstd",
    32017: "sz",
    32018: "fcidecomp",
    32024: "sz3",
    32026: "blosc2",
    32028: "sperr",
    32033: "htj2k",
}


_STATE: dict[str, str] = {}  # "error": why an installed hdf5plugin did not import


@functools.cache
def load() -> bool:
    """Import ``hdf5plugin`` once (registering its filters with HDF5); whether that worked.

    A broken install is not an error here: a file that needs one of its filters then stops
    with ``missing_filter_error`` (which says so), and one that does not is read as before.
    """
    try:
        import hdf5plugin  # noqa: F401
    except ModuleNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - e.g. built against another HDF5
        _STATE["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False
    return True


def missing_filter(plist) -> str | None:
    """Why HDF5 cannot decode a data set with the creation property list ``plist`` (its first
    filter without a registered decoder, and what to install), or None when it can."""
    for i in range(plist.get_nfilters()):
        fid, _flags, _values, raw_name = plist.get_filter(i)
        if h5py.h5z.filter_avail(fid):
            continue
        name = PLUGIN_FILTERS.get(fid) or raw_name.decode(errors="replace").split(";")[0]
        if fid in PLUGIN_FILTERS:
            fix = (
                f"hdf5plugin did not load ({_STATE['error']}): pip install --force-reinstall "
                "hdf5plugin"
                if "error" in _STATE
                else "pip install hdf5plugin (or pip install lepton_hpc[hdf5plugin])"
            )
        else:
            fix = "no HDF5 plugin for it is installed (see HDF5_PLUGIN_PATH)"
        return (
            f"compressed with {name or 'an unnamed filter'} (HDF5 filter {fid}), "
            f"which this HDF5 cannot decode: {fix}"
        )
    return None


def missing_filter_error(dset: h5py.Dataset, plist=None) -> DataError | None:
    """``missing_filter`` as the one-line error naming the file and the data set, or None.

    ``plist``: its creation property list, when the caller has it already.
    """
    why = missing_filter(dset.id.get_create_plist() if plist is None else plist)
    if why is None:
        return None
    return DataError(f"'{dset.file.filename}:{dset.name.lstrip('/')}' is {why}")

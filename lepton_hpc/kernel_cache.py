"""Numba's kernel cache for an installation its users cannot write to.

``make install PREFIX=...`` runs ``lepton warmup`` as the installing user, so the compiled
kernels land in the ``__pycache__`` folders beside the installed sources. Numba itself only
uses a ``__pycache__`` it can write to: for every other user it falls back to a cache of their
own (``NUMBA_CACHE_DIR`` when set, else ``~/.cache/numba``), which starts empty, and their first
run would compile everything again.

``InstalledCacheLocator`` (put first in Numba's list of cache locators by ``install()``) keeps
Numba's choice of directory for lepton_hpc's own sources and, where that is not the installed
``__pycache__``, first copies the installed cache files there, once per folder and process,
without replacing any file already there (the user's own compilations win). Files are copied
under a temporary name and renamed, data files before their index, so concurrent ranks never
read half a file or an index naming missing data. Numba then loads them as its own: its index
is keyed by the source file's content hash, the Python and Numba versions and the CPU name and
features, so a copied entry for another CPU is never used; that node compiles and caches its
own code, in the user's cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

_SEEDED: set[tuple[str, str]] = set()


def _writable(path: str) -> bool:
    """Numba's own test for a cache folder: create it, then a temporary file in it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _package_dirs() -> list[Path]:
    """lepton_hpc and its kernels (a separate tree in an editable install)."""
    import sys

    here = Path(__file__).resolve().parent
    dirs = [here]
    kernels = sys.modules.get("lepton_hpc.kernels")
    if kernels is not None and getattr(kernels, "__file__", None):
        dirs.append(Path(kernels.__file__).resolve().parent)
    return dirs


def seed(installed: Path, dest: Path) -> int:
    """Copy the cache of every function in ``installed`` that ``dest`` has no index for."""
    copied = 0
    for index in sorted(installed.glob("*.nbi")):
        if (dest / index.name).exists():
            continue
        base = index.name[: -len(".nbi")]
        for src in [*sorted(installed.glob(f"{base}.*.nbc")), index]:
            target = dest / src.name
            if target.exists():
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", dir=dest)
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out)
                os.replace(tmp, target)
            except OSError:
                Path(tmp).unlink(missing_ok=True)
                raise
            copied += 1
    return copied


def _locator_class():
    from numba.core import caching, config

    class InstalledCacheLocator(caching.UserWideCacheLocator):
        """Numba's cache folder for lepton_hpc's sources, seeded from the installed cache."""

        def __init__(self, py_func, py_file, path: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = path

        @classmethod
        def from_function(cls, py_func, py_file):
            folder = Path(py_file).resolve().parent
            if not any(folder == d or d in folder.parents for d in _package_dirs()):
                return None
            installed = folder / "__pycache__"
            if config.CACHE_DIR:
                sub = cls.get_suitable_cache_subpath(py_file)
                dest = os.path.join(config.CACHE_DIR, sub)
            elif _writable(str(installed)):
                return None  # Numba's own in-tree cache
            else:
                dest = caching.UserWideCacheLocator(py_func, py_file).get_cache_path()
            if not _writable(dest):
                return None
            key = (str(installed), dest)
            if key not in _SEEDED and installed.is_dir() and Path(dest) != installed:
                _SEEDED.add(key)
                # an unreadable installed cache: Numba compiles, as it would without one
                with contextlib.suppress(OSError):
                    seed(installed, Path(dest))
            return cls(py_func, py_file, dest)

    return InstalledCacheLocator


def install() -> None:
    """Put ``InstalledCacheLocator`` first in Numba's cache locators (once per process)."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # public from Numba 0.6x
    classes = impl._locator_classes
    if not any(c.__name__ == "InstalledCacheLocator" for c in classes):
        classes.insert(0, _locator_class())

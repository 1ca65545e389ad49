"""Hand-written LLVM code for the tuned CPU kernels, and the check that decides whether it runs.

Every ``numba.extending.intrinsic`` of the project lives in this package: ``intrinsics`` (bit
casts, prefetch hints, libc ``pread``) and ``simd`` (explicit float64 vectors and the vectorised
loss heads). Such code depends on the LLVM that llvmlite ships and on what the CPU offers, so
the tuned kernels are used only on combinations that were tested (``supported``); anywhere else
the CPU backend runs ``lepton_hpc.kernels.reference``, plain ``@njit`` code.
"""

from __future__ import annotations

import functools
import platform
import re
from importlib import metadata

# [low, high) release ranges the tuned kernels were tested with (keep in step with setup.cfg).
TESTED = {"numba": ((0, 68), (0, 69)), "llvmlite": ((0, 50), (0, 51))}
# x86-64 features the tuned code is written for (the vector loops assume AVX2 and FMA).
REQUIRED_FEATURES = ("avx2", "fma")


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '0.61.2' or '0.62.0rc1'."""
    numbers = []
    for piece in version.split(".")[:2]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def host_features() -> dict[str, bool]:
    """The host CPU's features as LLVM names them (empty when Numba targets another CPU)."""
    from numba import config

    if config.CPU_NAME not in (None, "host"):
        return {}
    import llvmlite.binding as llvm

    return dict(llvm.get_host_cpu_features())


def has_avx512() -> bool:
    """Whether Numba compiles for this host and it has AVX-512 (32 registers of 8 float64)."""
    return bool(host_features().get("avx512f", False))


@functools.cache
def _check() -> tuple[bool, str]:
    for package, (low, high) in TESTED.items():
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            return False, f"{package} is not installed as a distribution"
        if not low <= _release(version) < high:
            tested = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
            return False, f"{package} {version} is outside the tested range {tested}"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return False, f"CPU architecture {machine} is not one the tuned kernels were tested on"
    features = host_features()
    if not features:
        return False, "Numba compiles for a named CPU (NUMBA_CPU_NAME), not this host"
    missing = [f for f in REQUIRED_FEATURES if not features.get(f, False)]
    if missing:
        return False, f"the CPU lacks {', '.join(missing)}"
    from numba import __version__ as numba_version

    simd = "AVX-512" if has_avx512() else "AVX2"
    return True, f"numba {numba_version}, llvmlite {metadata.version('llvmlite')}, {simd}"


def supported() -> tuple[bool, str]:
    """(True, what was found) when the tuned kernels may run here; else (False, why not)."""
    return _check()

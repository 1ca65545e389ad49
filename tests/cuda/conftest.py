"""GPU test gating in Horovod's ``skip_or_fail_gpu_test`` style.

Kernel tests run on a real GPU, or on the Numba CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1``
(``make test-cuda``). Without either they are skipped, unless ``LEPTON_REQUIRE_GPU=1``: then a
missing GPU is a failure, so a GPU CI job cannot pass by silently skipping everything (the
simulator does not count as a GPU there). Jobs started from the tests (``lepton train``) use a
real GPU when one is visible, and the simulator only when there is none (``gpu_env``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

_PROBE = "from numba import cuda; print(bool(cuda.is_available()))"


@functools.cache
def real_gpu_visible() -> bool:
    """Whether numba.cuda sees a real GPU, asked in a child without the simulator (this process
    may have been started with ``NUMBA_ENABLE_CUDASIM=1``, which numba reads once, at import)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    try:
        res = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and res.stdout.strip() == "True"


@pytest.fixture(scope="session")
def gpu_env() -> dict[str, str]:
    """Environment entries for a job started from a test: the real GPU when one is visible,
    else Numba's CUDA simulator."""
    return {"NUMBA_ENABLE_CUDASIM": "0" if real_gpu_visible() else "1"}


def gpu_required() -> bool:
    """True when the environment demands a real GPU (``LEPTON_REQUIRE_GPU=1``)."""
    return os.environ.get("LEPTON_REQUIRE_GPU", "0") == "1"


def skip_or_fail_gpu_test(message: str) -> None:
    """Fail the test if GPUs are required (``LEPTON_REQUIRE_GPU=1``), otherwise skip it."""
    if gpu_required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def gpu_gate():
    """The skip-or-fail helper itself, for tests of the gating."""
    return skip_or_fail_gpu_test


@pytest.fixture(scope="session")
def kc():
    """The CUDA kernel module, once a GPU (or, when none is required, the simulator) is usable."""
    from lepton_hpc.kernels import cuda as kernels

    if not kernels.is_available():
        skip_or_fail_gpu_test("numba.cuda sees no GPU and NUMBA_ENABLE_CUDASIM is not set")
    if gpu_required() and kernels.using_simulator():
        skip_or_fail_gpu_test("LEPTON_REQUIRE_GPU=1 but only the CUDA simulator is enabled")
    return kernels

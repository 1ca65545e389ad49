"""GPU test gating in Horovod's ``skip_or_fail_gpu_test`` style.

Kernel tests run on a real GPU, or on the Numba CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1``
(``make test-cuda``). Without either they are skipped, unless ``LEPTON_REQUIRE_GPU=1``: then a
missing GPU is a failure, so a GPU CI job cannot pass by silently skipping everything (the
simulator does not count as a GPU there).
"""

from __future__ import annotations

import os

import pytest


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

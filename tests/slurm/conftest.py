"""The one-node Slurm cluster of the Slurm tests: installed when missing, started once a session.

The tests are skipped, with the reason, only where Slurm cannot be installed (not root, no
apt-get, apt-get failed). Under CI (``CI=true``) that is a failure instead: CI must run them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PYTHON, mpi_env
from tests.slurm.cluster import CannotInstall, SlurmCluster, ensure_installed, in_ci


@pytest.fixture(scope="session")
def slurm():
    """A running one-node Slurm cluster (4 CPUs, so two 2-rank jobs run at once)."""
    try:
        ensure_installed()
    except CannotInstall as exc:
        if in_ci():
            pytest.fail(f"CI=true but Slurm cannot be installed: {exc}", pytrace=False)
        pytest.skip(f"Slurm cannot be installed here: {exc}")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def job_env(slurm):
    """Environment for srun and sbatch: the MPI test settings, SLURM_CONF, the venv's lepton."""

    def make(**extra: str) -> dict[str, str]:
        env = slurm.env(mpi_env(**extra))
        env["PATH"] = f"{Path(PYTHON).parent}:{env['PATH']}"
        return env

    return make

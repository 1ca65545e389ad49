"""The module environment: ``make install PREFIX=...`` then, in a fresh login shell,
``module use PREFIX/modulefiles; module load lepton_hpc; lepton doctor`` passes.

Debian's ``lmod`` is installed when missing; the test is skipped only where it cannot be (not
root, no apt-get, apt-get failed), and fails instead under CI (``CI=true``). The prefix install
reuses the build tree's parallel h5py as a wheel, so it takes seconds, not a compile.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT
from tests.slurm.cluster import CannotInstall, apt_get_install, in_ci

LMOD_INIT = Path("/etc/profile.d/lmod.sh")


@pytest.fixture(scope="module")
def lmod():
    if not LMOD_INIT.exists():
        try:
            apt_get_install(("lmod",))
        except CannotInstall as exc:
            if in_ci():
                pytest.fail(f"CI=true but lmod cannot be installed: {exc}", pytrace=False)
            pytest.skip(f"lmod cannot be installed here: {exc}")
    assert LMOD_INIT.exists(), "lmod installed but /etc/profile.d/lmod.sh is missing"


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """``make install PREFIX=<tmp>`` (with the Makefile's include of jobs/prefix.mk, or the
    fragment given alongside while the Makefile does not include it yet)."""
    where = tmp_path_factory.mktemp("prefix") / "lepton_hpc"
    included = "jobs/prefix.mk" in (ROOT / "Makefile").read_text()
    files = [] if included else ["-f", "Makefile", "-f", "jobs/prefix.mk"]
    venv = Path(PYTHON).parent.parent  # the build tree's venv, whatever PREFIX is
    # PREFIX_WARMUP=0: the module and the install are tested here, not the compiler (``lepton
    # warmup`` has tests of its own); it would compile every kernel again, on one core, for
    # 630-690 s on a 2-core AMD EPYC guest
    cmd = ["make", *files, "install", f"PREFIX={where}", f"VENV={venv}", "PREFIX_WARMUP=0"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    yield where
    shutil.rmtree(where, ignore_errors=True)


def login_shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bash -l -c SCRIPT`` with an environment as a new login has it (no venv on the PATH)."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    env.update(TERM="dumb", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run(
        ["bash", "-l", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_prefix_install_is_self_contained(prefix):
    assert (prefix / "modulefiles" / "lepton_hpc.lua").is_file()
    text = (prefix / "modulefiles" / "lepton_hpc.lua").read_text()
    assert f'local prefix = "{prefix}"' in text and "@PREFIX@" not in text
    assert (prefix / "bin" / "lepton").resolve() == (prefix / "venv" / "bin" / "lepton").resolve()
    assert (prefix / "share" / "lepton_hpc" / "jobs" / "slurm_train.sbatch").is_file()
    # a non-editable copy: the package is imported from the prefix, not from the build tree
    where = subprocess.run(
        [prefix / "venv" / "bin" / "python", "-c", "import lepton_hpc; print(lepton_hpc.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(prefix / "venv")), where


def test_module_load_in_a_fresh_login_shell_then_doctor_passes(lmod, prefix, tmp_path):
    script = f"""
set -e
module use {prefix}/modulefiles
module load lepton_hpc
command -v lepton
lepton --version
lepton doctor --run-dir {tmp_path}/runs
lepton datagen --task linear --rows 50 --features 3 --out {tmp_path}/d.h5
"""
    res = login_shell(script, tmp_path)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert lines[0] == f"{prefix}/bin/lepton"
    checks = [x for x in lines if x.startswith("[")]
    assert checks and not any(x.startswith("[FAIL]") for x in checks), res.stdout
    assert any("h5py parallel (mpio)" in x and "mpio driver: True" in x for x in checks)
    assert (tmp_path / "d.h5").is_file()


def test_without_the_module_lepton_is_not_on_the_path(lmod, prefix, tmp_path):
    res = login_shell("command -v lepton || echo absent", tmp_path)
    assert res.stdout.strip().splitlines()[-1] == "absent"

"""Shared test helpers: launching real ``mpiexec -n N`` jobs, always under a timeout.

The pytest process itself never initialises MPI for these launches: ``run_mpi`` starts mpiexec
with an environment free of the MPI singleton's variables, in its own process group, and kills
the whole group when the timeout expires, so a hung job fails the test instead of CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SCRIPTS = Path(__file__).resolve().parent / "mpi" / "scripts"


def mpi_env(**extra: str) -> dict[str, str]:
    """os.environ without OMPI_*/PMIX_* singleton variables, plus what mpiexec needs as root."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_")) or k.startswith(("OMPI_ALLOW", "OMPI_MCA"))
    }
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl="self,vader,tcp",
        OMPI_MCA_btl_tcp_if_include="lo",
        OMPI_MCA_oob_tcp_if_include="lo",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_mpi(
    n: int,
    args: list[str],
    *,
    timeout: float = 180,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``mpiexec -n n python ARGS`` to completion or kill its process group at ``timeout``."""
    import time

    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", PYTHON, *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env=env or mpi_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} hung for {timeout} s\n{out}\n{err}")
    return Result(proc.returncode, out, err, time.monotonic() - t0)


def lepton(n: int, *args: str, **kw) -> Result:
    """``mpiexec -n n python -m lepton_hpc ARGS``."""
    return run_mpi(n, ["-m", "lepton_hpc", *map(str, args)], **kw)


def ok(res: Result) -> Result:
    assert res.returncode == 0, (
        f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    )
    return res


def write_h5(path: Path, X: np.ndarray, y: np.ndarray | None = None, **extra: np.ndarray) -> Path:
    import h5py

    with h5py.File(path, "w") as fh:
        fh["X"] = X
        if y is not None:
            fh["y"] = y
        for k, v in extra.items():
            fh[k] = v
    return path


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    """A TOML config from nested dicts (strings, numbers, bools and lists of those)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def read_params(model_file: Path) -> np.ndarray:
    import h5py

    with h5py.File(model_file, "r") as fh:
        return fh["params"][()]


def start_mpi(
    n: int, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``mpiexec -n n python ARGS`` in its own process group (for signal tests)."""
    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", PYTHON, *args]
    return subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env=env or mpi_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> Result:
    """Wait for a started job; kill its process group and fail the test if it outlives timeout."""
    import time

    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"job still running after {timeout} s\n{out}\n{err}")
    return Result(proc.returncode, out, err, time.monotonic() - t0)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the ranks mpiexec started on this node (from their environment)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(launcher_pid)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    ranks = {}
    for pid in map(int, out.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                ranks[int(item.split(b"=")[1])] = pid
    return ranks

"""Starting ``mpiexec`` (or any job) from a process that is not itself an MPI rank.

One place for what tests, the benchmark and ``lepton doctor`` all need: an environment without
the MPI singleton's variables (a child mpiexec exits 1 when it inherits them), OpenMPI kept on
shared memory and loopback, and a run that can never outlive its timeout (the whole process
group is killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass


def mpi_env(**extra: str) -> dict[str, str]:
    """``os.environ`` less OMPI_*/PMIX_* singleton variables (OMPI_ALLOW*/OMPI_MCA* kept).

    Loopback and shared memory are defaults (a site's own OMPI_MCA_* settings win); as root,
    OpenMPI's run-as-root permission is added. ``extra`` is applied last.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_")) or k.startswith(("OMPI_ALLOW", "OMPI_MCA"))
    }
    for key, value in {
        "OMPI_MCA_btl": "self,vader,tcp",
        "OMPI_MCA_btl_tcp_if_include": "lo",
        "OMPI_MCA_oob_tcp_if_include": "lo",
    }.items():
        env.setdefault(key, value)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass(slots=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


def start(cmd: list[str], *, env: dict[str, str] | None = None, cwd=None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, so that it can be ended as a whole."""
    return subprocess.Popen(
        cmd,
        env=env if env is not None else mpi_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> Finished:
    """Wait for ``proc``; at ``timeout`` (or on Ctrl-C) kill its whole process group."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return Finished(proc.returncode, out, err, timed_out=True)
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    return Finished(proc.returncode, out, err, timed_out=False)


def run_bounded(
    cmd: list[str], timeout: float, *, env: dict[str, str] | None = None, cwd=None
) -> Finished:
    """``finish(start(cmd), timeout)``."""
    return finish(start(cmd, env=env, cwd=cwd), timeout)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)

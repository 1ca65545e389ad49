"""Starting the parts: ``mpiexec`` lines, a clean environment, timeouts, and the background
load of the (shared) machine while each part ran.

Nothing here initialises MPI: each ``mpiexec`` gets an environment free of the singleton's
OMPI_*/PMIX_* variables (except OMPI_ALLOW*/OMPI_MCA*), from ``lepton_hpc.launch``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from ..launch import mpi_env, run_bounded

PY = sys.executable


def mpiexec(k: int, cores: int) -> list[str]:
    """``mpiexec -n k``, unbound: on a shared node a rank pinned to a busy core cannot move away,
    and one stalled rank stalls every step of the others."""
    over = ["--oversubscribe"] if k > cores else []
    return ["mpiexec", "-n", str(k), *over, "--bind-to", "none"]


def flags(**options) -> list[str]:
    """``flags(x_bin="X", rows=4)`` -> ``["--x-bin", "X", "--rows", "4"]``."""
    return [item for k, v in options.items() for item in (f"--{k.replace('_', '-')}", str(v))]


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for launched jobs (``lepton_hpc.launch.mpi_env``)."""
    return mpi_env(**extra)


def run_command(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str, str]:
    """Run to completion, or kill the whole process group at ``timeout`` (rc 124) or on Ctrl-C."""
    done = run_bounded(cmd, timeout, env=env)
    if done.timed_out:
        return 124, done.stdout, done.stderr + f"\n(killed after {timeout:.0f} s)"
    return done.returncode, done.stdout, done.stderr


class BackgroundLoad:
    """How busy the machine was with other people's work while a part ran: the CPU time of the
    whole machine (/proc/stat) less that of our own finished children, in cores on average."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = _busy_seconds()
        self.ours0 = _our_cpu()
        self.loadavg0 = os.getloadavg()[0]

    def end(self) -> dict:
        wall = max(time.monotonic() - self.t0, 1e-9)
        busy, ours = _busy_seconds(), _our_cpu()
        out = {"loadavg_1min_start": round(self.loadavg0, 2)}
        if busy is not None and self.busy0 is not None:
            other = (busy - self.busy0 - (ours - self.ours0)) / wall
            out["other_processes_cores"] = round(max(0.0, other), 2)
        return out


def _busy_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (None where /proc/stat is missing)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _our_cpu() -> float:
    """CPU seconds of this process and of its finished children (mpiexec waits for its ranks)."""
    import resource

    own, kids = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def horovod_importable(env: dict[str, str]) -> str | None:
    """None when ``horovod.torch`` imports with MPI (checked in a child process), else why not."""
    if importlib.util.find_spec("horovod") is None:
        return "horovod is not installed (make install-horovod)"
    rc, _, err = run_command(
        [PY, "-c", "import horovod.torch as h; assert h.mpi_built(), 'built without MPI'"], 120, env
    )
    return None if rc == 0 else f"import horovod.torch failed: {err.strip().splitlines()[-1:]}"

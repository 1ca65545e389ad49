"""Shared test helpers: launching real ``mpiexec -n N`` jobs, always under a timeout.

The pytest process itself never initialises MPI for these launches: ``run_mpi`` starts mpiexec
with an environment free of the MPI singleton's variables, in its own process group, and kills
the whole group when the timeout expires, so a hung job fails the test instead of CI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lepton_hpc import launch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SCRIPTS = Path(__file__).resolve().parent / "mpi" / "scripts"


def mpi_env(**extra: str) -> dict[str, str]:
    """The launch environment of ``lepton_hpc.launch`` plus oversubscription for 3 ranks on 2 cores."""
    return launch.mpi_env(OMPI_MCA_rmaps_base_oversubscribe="1", **extra)


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
    return finish(start_mpi(n, args, env=env, cwd=cwd), timeout)


def lepton(n: int, *args: str, **kw) -> Result:
    """``mpiexec -n n python -m lepton_hpc ARGS``."""
    return run_mpi(n, ["-m", "lepton_hpc", *map(str, args)], **kw)


def datagen(
    path: Path, rows: int, features: int, seed: int, task: str = "logistic", ranks: int = 1
) -> Path:
    """``lepton datagen`` into ``path`` (checked), for test fixtures."""
    ok(
        lepton(
            ranks,
            "datagen",
            "--task",
            task,
            "--rows",
            rows,
            "--features",
            features,
            "--seed",
            seed,
            "--out",
            path,
        )
    )
    return path


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


def small_mlp_config(tmp_path: Path, data: Path, name: str, epochs: int, **extra: dict) -> Path:
    """The small checkpointed MLP job the fault, failover and watchdog tests interrupt: Adam,
    batch 40, a checkpoint every 10 steps, run directory ``tmp_path/name``; ``extra`` updates
    sections (``checkpoint={"mirror": ...}``)."""
    sections = {
        "data": {"train": str(data), "validation_fraction": 0.1, "scale": "zscore"},
        "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": epochs, "batch_size": 40, "seed": 3},
        "checkpoint": {"every_steps": 10, "keep": 3},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in extra.items():
        sections.setdefault(key, {}).update(body)
    return write_config(tmp_path / f"{name}.toml", sections)


def read_params(model_file: Path) -> np.ndarray:
    import h5py

    with h5py.File(model_file, "r") as fh:
        return fh["params"][()]


def start_mpi(
    n: int, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``mpiexec -n n python ARGS`` in its own process group (for signal tests)."""
    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", PYTHON, *args]
    return launch.start(cmd, env=env or mpi_env(), cwd=cwd or ROOT)


def finish(proc: subprocess.Popen, timeout: float) -> Result:
    """Wait for a started job; its process group is killed and the test fails past ``timeout``."""
    t0 = time.monotonic()
    done = launch.finish(proc, timeout)
    if done.timed_out:
        pytest.fail(
            f"{' '.join(map(str, proc.args))} still running after {timeout} s\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - t0)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has already closed its files, locks included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_job(proc: subprocess.Popen, timeout: float = 30) -> Result:
    """SIGKILL a started job as a node failure would: mpiexec's group and every rank, then wait
    until the ranks are gone (OpenMPI puts ranks in their own process groups, and a rank whose
    mpiexec died can live on for a moment still holding its run directory's lock)."""
    ranks = list(rank_pids(proc.pid).values())
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    done = finish(proc, timeout)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in ranks):
        if time.monotonic() > deadline:
            pytest.fail(f"ranks {ranks} still alive {timeout} s after SIGKILL")
        time.sleep(0.02)
    return done


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    """Wait until the started job ``proc`` has written a checkpoint in ``run`` (the moment a
    signal test interrupts it); the test fails if the job ends first or ``timeout`` passes."""
    t0 = time.monotonic()
    while not list((Path(run) / "checkpoints").glob("ckpt-*.h5")):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            pytest.fail(f"no checkpoint appeared: {finish(proc, timeout=10)}")
        time.sleep(0.05)


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

"""The run directory, written by rank 0 only: status, metrics, results, model and plot.

``status.json`` is rewritten atomically at each change (running, completed, stopped at step N,
failed on rank R with error E) so job scripts can trust it more than mpirun's exit code. Every
writer goes through ``safety`` (per-process temporary names, fsync of file and directory).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The writers and run-directory guards live in ``safety``; re-exported for existing imports.
from .safety import (
    RunLock,
    atomic_write_text,
    check_run_dir,
    create_run_dir,
    finite_json,
    write_json,
)

__all__ = [
    "RunDir",
    "RunLock",
    "atomic_write_text",
    "build_results",
    "check_run_dir",
    "create_run_dir",
    "versions",
    "write_json",
]


class RunDir:
    """Paths and writers of a run directory; create it on rank 0 only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.status_file = self.path / "status.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.results_file = self.path / "results.json"
        self.model_file = self.path / "model.h5"
        self.plot_file = self.path / "history.png"

    def status(self, state: str, **fields: Any) -> None:
        write_json(
            self.status_file,
            {"status": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields},
        )

    def write_history(self, history: list[dict]) -> None:
        """metrics.jsonl: one JSON line per finished epoch (rewritten whole, so resume is clean)."""
        lines = (json.dumps(finite_json(h), allow_nan=False, default=str) + "\n" for h in history)
        atomic_write_text(self.metrics_file, "".join(lines))


def build_results(
    *,
    ranks: int,
    device: str,
    threads: int,
    epochs: int,
    steps: int,
    model: dict,
    n_params: int,
    rows_train: int,
    rows_val: int,
    metrics: dict,
    seconds: Mapping[str, float],
    loop_s: float,
    total_s: float,
    rows_seen: float,
    config: dict,
    ranks_timing: list[dict] | None = None,
    memory: dict | None = None,
) -> dict:
    """results.json of a completed run, from plain values.

    ``seconds``: time per kind of work (io, compute, comm, eval, checkpoint; missing ones are 0),
    and ``compile``: Numba compiling kernels (not counted in the others), ``compile_loop``: the
    part of it inside the loop;
    ``rows_seen``: rows summed by every reduction of the loop (the throughput's numerator, over
    ``loop_s`` less ``compile_loop``: a cold kernel cache never understates the throughput; both
    are in results.json as ``throughput.rows`` and ``throughput.s``);
    ``ranks_timing``: per rank (in rank order) its host, ``compute_s`` (time in the steps outside
    the reduction: its own work), ``comm_s`` (time in the reduction, mostly waiting for the
    slowest rank) and ``steps`` this process ran: a straggler shows a high compute_s while the
    others show a high comm_s.
    ``memory``: per rank (in rank order) ``peak_rss_mb`` (``peak_rss_mb()``), ``data_mb``, the
    bytes of the rows it holds (X and y, training and validation), and ``model_mb``, the bytes of
    the parameters and optimiser state it holds (its slices under tensor parallelism), all in
    MiB: what the data and the model cost a rank against what it peaked at.
    """
    busy_s = loop_s - seconds.get("compile_loop", 0.0)  # the throughput's denominator
    results = {
        "status": "completed",
        "ranks": ranks,
        "device": device,
        "threads_per_rank": threads,
        "epochs": epochs,
        "steps": steps,
        "model": model,
        "n_params": n_params,
        "rows": {"train": rows_train, "val": rows_val},
        "metrics": metrics,
        "timing": {
            "io_s": seconds.get("io", 0.0),
            "compute_s": seconds.get("compute", 0.0),
            "comm_s": seconds.get("comm", 0.0),
            "eval_s": seconds.get("eval", 0.0),
            "checkpoint_s": seconds.get("checkpoint", 0.0),
            "compile_s": seconds.get("compile", 0.0),
            "loop_s": loop_s,
            "total_s": total_s,
        },
        "throughput": {
            "rows_per_s": rows_seen / max(busy_s, 1e-12),
            "rows": rows_seen,
            "s": busy_s,
        },
        "config": config,
        "versions": versions(),
    }
    if ranks_timing is not None:
        results["ranks_timing"] = [dict(t, rank=r) for r, t in enumerate(ranks_timing)]
    if memory is not None:
        results["memory"] = memory
    return results


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB: VmHWM of /proc/self/status (Linux), else
    ``ru_maxrss`` (KiB on Linux, bytes on macOS); None where neither is known."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def versions() -> dict[str, str]:
    """Versions of the stack, for results.json (lazy imports: only what is loaded anyway)."""
    import h5py
    import mpi4py
    import numba
    import numpy as np

    from . import __version__

    return {
        "lepton_hpc": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "h5py": h5py.version.version,
        "mpi4py": mpi4py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "h5py_parallel": str(h5py.get_config().mpi),
    }

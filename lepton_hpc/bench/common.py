"""What every part of the benchmark shares: repeat timing, the data files, the parameters, and
the JSON a part hands back to the orchestrator.

A part is a small program (``python -m lepton_hpc.bench.<module> PART ...``) that the runner
starts in its own process (under ``mpiexec -n k`` when it needs ranks), so thread pools of
different libraries never share a process and the orchestrator never initialises MPI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

GLOBAL_BATCH = 4096  # the mini-batch comparisons' global batch
L2 = 1e-4  # the L2 penalty of the time-to-loss comparison (ours: model.l2; sklearn: C = 1/(L2 n))
PARAM_SEED = 12345  # the parameters at which every gradient is evaluated


def figure(value: float, unit: str, **extra) -> dict:
    """One measured number with its unit (and anything that qualifies it)."""
    return {"value": float(value), "unit": unit, **extra}


def time_it(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Warm-up calls, then ``repeats`` timed calls: median, min, max and the samples (seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summary(samples)


def time_rotating(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Like ``time_it`` for several functions called in turn (A B C A B C ...), so that load from
    other processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: summary(s) for name, s in samples.items()}


def summary(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": len(samples),
        "samples_s": [round(s, 7) for s in samples],
    }


def cores() -> int:
    """Cores this process may use (its CPU binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def bench_params(d: int) -> np.ndarray:
    """The logistic-regression parameters [w_0 .. w_{d-1}, b] every gradient is evaluated at."""
    return np.random.default_rng(PARAM_SEED).normal(size=d + 1) * 0.1


def launcher_rank_size() -> tuple[int, int]:
    """(rank, size) from the launcher's variables (for parts that do not use mpi4py)."""
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    return rank, size


# ---- the raw copy of the data set ---------------------------------------------------------
def load_raw(
    x_bin: str, y_bin: str, rows: int, features: int, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of the flat copies of X (float32, row-major) and y (float64), in
    64-byte aligned arrays as ``lepton train`` has them (every contender gets the same)."""
    from ..data.reader import aligned_empty, pread_rows

    stop = rows if stop is None else stop
    X = aligned_empty((stop - start, features), np.float32)
    y = aligned_empty((stop - start,), np.float64)
    pread_rows(x_bin, 0, start, X, 1)
    pread_rows(y_bin, 0, start, y.reshape(-1, 1), 1)
    return X, y


def part_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every part takes: which part, the data, repeats and the JSON to write."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("part")
    p.add_argument("--h5", default="")
    p.add_argument("--x-bin", default="")
    p.add_argument("--y-bin", default="")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--features", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--sizes", default="")
    p.add_argument("--out", required=True)
    return p


def write_part(path: str | Path, result: dict) -> None:
    """The part's result for the runner (written by one process: rank 0 under mpiexec)."""
    Path(path).write_text(json.dumps(result, indent=1))


def buffer_sizes(spec: str) -> list[int]:
    """Buffer sizes in bytes from '8,64,...' (default: 8 B to 8 MiB in factors of 4)."""
    if spec:
        return [int(s) for s in spec.split(",")]
    return [8 * 4**k for k in range(11)]  # 8 B .. 8 MiB


def repeats_for(nbytes: int, repeats: int = 7) -> int:
    """Enough calls to see a small collective's latency, few for the big ones (scaled by the
    run's ``--repeats``, 7 by default)."""
    base = 300 if nbytes <= 4096 else (100 if nbytes <= 1 << 18 else 20)
    return max(5, base * repeats // 7)


def evict(path: str) -> None:
    """Drop the file's clean pages from the page cache (``POSIX_FADV_DONTNEED``): the next read
    comes from the device. Per file, no privileges, nothing else on the node is touched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

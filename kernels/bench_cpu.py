"""Bandwidth check of the CPU gradient kernels: ``python -m lepton_hpc.kernels.bench_cpu [rounds]``.

Times one full-batch gradient (linear and logistic) on 4,000,000 x 32 float32 against the
"memory-read ceiling": the bench's Numba ``prange`` pass that only sums every element of the
same array (``lepton_hpc.bench.micro.read_sum``).
The three are timed in rotation so that load from other processes hits them alike; the medians
are reported with ratio = ceiling time / kernel time (1.0 = running at read bandwidth).
"""

import sys
import time

import numba
import numpy as np

from lepton_hpc.bench.micro import read_sum

from . import BINARY, SIGMOID, SQUARED, cpu, param_count


def main(rounds: int = 9, n: int = 4_000_000, d: int = 32) -> dict[str, float]:
    """Print and return the median times (seconds) of ceiling, linear and logistic passes."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = (rng.random(n) < 0.5).astype(np.float64)
    sizes = np.array([d, 1])
    params = rng.normal(size=param_count(sizes)) * 0.1
    out = np.zeros(params.size + 2)
    runs = {
        "ceiling": lambda: read_sum(X.reshape(-1), X.dtype.type(0)),
        "linear": lambda: cpu.gradient(X, y, params, sizes, SIGMOID, SQUARED, out),
        "logistic": lambda: cpu.gradient(X, y, params, sizes, SIGMOID, BINARY, out),
    }
    for run in runs.values():  # compile and warm up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{n} x {d} float32, {numba.get_num_threads()} threads, medians of {rounds} rounds")
    gbps = X.nbytes / med["ceiling"] / 1e9
    print(f"read ceiling {med['ceiling'] * 1e3:7.1f} ms  {gbps:.1f} GB/s")
    for name in ("linear", "logistic"):
        print(f"{name:12s} {med[name] * 1e3:7.1f} ms  ratio {med['ceiling'] / med[name]:.2f}")
    return med


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)

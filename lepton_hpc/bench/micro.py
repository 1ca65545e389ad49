"""In-process measurements on one node: the memory-read ceiling, our fused gradient, NumPy's.

    python -m lepton_hpc.bench.micro memory --x-bin X --y-bin Y --rows N --features D --out J
    python -m lepton_hpc.bench.micro numpy  (same arguments)

``memory`` times, in rotation, a Numba ``prange`` read of every element of X (the ceiling: the
fastest a pass over the data can be) and ``lepton_hpc.kernels.cpu.gradient`` on the same array,
first with every core, then with one thread. ``numpy`` times the float64 reference gradient
(the data converted to float64 once, outside the timing). Both store the gradient they computed,
so the runner can check that they agree.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .common import bench_params, cores, figure, load_raw, part_parser, time_rotating, write_part

READ_CHUNK = 1 << 16  # elements per parallel task of the read ceiling


@njit(parallel=True, fastmath=True, cache=True)
def read_sum(flat, zero):  # pragma: no cover - compiled
    """Sum of every element of a 1-D array: a pure streaming read, vectorised, all threads.

    Each task reads a slice, so its indices are provably >= 0: Numba then emits no negative-index
    wraparound and LLVM vectorises the sum (indexing ``flat[i]`` directly runs ~5x slower). Each
    task sums in the array's own precision (``zero``: its dtype's 0): widening float32 to float64
    costs a conversion per element, and that made this "ceiling" about 9 % slower than the
    memory (16.7 against 15.3 ms on 512 MB, 2 threads), flattering every ratio to it. One load per
    cache line instead of per element measured slower still (16.9 ms): the prefetchers stream
    best behind dense loads. Task sums are kept in float64.
    """
    n = flat.size
    n_chunks = (n + READ_CHUNK - 1) // READ_CHUNK
    part = np.zeros(n_chunks)
    for c in prange(n_chunks):
        chunk = flat[c * READ_CHUNK : min(n, (c + 1) * READ_CHUNK)]
        s = zero
        for i in range(chunk.size):
            s += chunk[i]
        part[c] = s
    return part.sum()


def _gradient_figures(prefix: str, seconds: float, X: np.ndarray) -> dict:
    return {
        f"{prefix}_s": figure(seconds, "s"),
        f"{prefix}_GBps": figure(X.nbytes / seconds / 1e9, "GB/s", note="bytes of X / time"),
        f"{prefix}_rows_per_s": figure(X.shape[0] / seconds, "rows/s"),
    }


def memory(args) -> dict:
    """Read ceiling and our fused logistic gradient, all cores then one thread, in rotation."""
    from ..kernels import BINARY, SIGMOID, cpu

    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features)
    flat = X.reshape(-1)
    params = bench_params(args.features)
    sizes = np.array([args.features, 1], dtype=np.int64)
    out = np.zeros(params.size + 2)

    def ours():
        cpu.gradient(X, y, params, sizes, SIGMOID, BINARY, out)

    def ceiling():
        read_sum(flat, flat.dtype.type(0))

    threads = min(cores(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    many = time_rotating({"ceiling": ceiling, "ours": ours}, args.repeats)
    numba.set_num_threads(1)
    one = time_rotating({"ceiling": ceiling, "ours": ours}, max(3, args.repeats // 2))
    numba.set_num_threads(threads)
    ours()
    figures = {}
    for name, stats, tag in (
        ("ceiling", many["ceiling"], ""),
        ("ours", many["ours"], ""),
        ("ceiling", one["ceiling"], "_1thread"),
        ("ours", one["ours"], "_1thread"),
    ):
        figures.update(_gradient_figures(name + tag, stats["median_s"], X))
    figures["ceiling_best_s"] = figure(many["ceiling"]["min_s"], "s", note="fastest repeat")
    figures["ours_best_s"] = figure(many["ours"]["min_s"], "s", note="fastest repeat")
    n = float(out[-1])
    return {
        "threads": threads,
        "threading_layer": numba.threading_layer(),
        "timings": {"all_cores": many, "one_thread": one},
        "figures": figures,
        "gradient": (out[:-2] / n).tolist(),
        "loss": float(out[-2] / n),
    }


def reference_gradient(X64: np.ndarray, y: np.ndarray, params: np.ndarray):
    """Mean logistic-loss gradient and mean loss in float64 NumPy (BLAS matrix-vector products)."""
    w, b = params[:-1], params[-1]
    z = X64 @ w + b
    r = 1.0 / (1.0 + np.exp(-z)) - y
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    n = X64.shape[0]
    return np.r_[X64.T @ r, r.sum()] / n, loss


def numpy_reference(args) -> dict:
    """The float64 NumPy reference gradient on the same rows (converted once, not timed)."""
    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features)
    X64 = X.astype(np.float64)
    del X
    params = bench_params(args.features)
    result = {}

    def ref():
        result["g"] = reference_gradient(X64, y, params)

    stats = time_rotating({"numpy": ref}, args.repeats)["numpy"]
    g, loss = result["g"]
    figures = {
        "numpy_f64_s": figure(stats["median_s"], "s"),
        "numpy_f64_rows_per_s": figure(X64.shape[0] / stats["median_s"], "rows/s"),
    }
    return {"timings": {"numpy": stats}, "figures": figures, "gradient": g.tolist(), "loss": loss}


PARTS = {"memory": memory, "numpy": numpy_reference}


def main() -> None:
    args = part_parser(__doc__).parse_args()
    write_part(args.out, PARTS[args.part](args))


if __name__ == "__main__":
    main()

"""Bandwidth check of the CPU gradient kernels against the memory-read ceiling.

``python -m lepton_hpc.kernels.bench_cpu [rounds] [--features 8,32,256] [--mib 8,512]
[--products float64,float32]``

Times one full-batch gradient (linear and logistic, through ``cpu.gradient``) on float32 rows of
each feature count, against the "memory-read ceiling": the bench's Numba ``prange`` pass that
only sums every element of the same array (``lepton_hpc.bench.micro.read_sum``). The default is
the tuned shape, 4,000,000 x 32 (512 MB). ``--mib`` sets the array's size instead: a few MiB
stay in the last-level cache, so the kernels' rate there is their compute bound, and the same
kernels from memory show how much of it they keep when the rows stream from DRAM. Small arrays
are timed over repeated calls (about 64 MiB of rows a timing) so that the timer and the
threads' wake-up do not dominate.

The runs are timed in rotation so that load from other processes hits them alike; the medians
are reported with ratio = ceiling time / kernel time (1.0 = running at read bandwidth).
"""

import argparse
import time

import numba
import numpy as np

from lepton_hpc.bench.micro import read_sum

from . import BINARY, SIGMOID, SQUARED, cpu, param_count

TUNED_ROWS = 4_000_000


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _products(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    bad = [v for v in names if v not in cpu.PRODUCTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"products must be among {sorted(cpu.PRODUCTS)}: {text!r}")
    return names


def time_shape(
    n: int, d: int, rounds: int, products: list[str], repeats: int = 1
) -> dict[str, float]:
    """Median seconds of one call of the ceiling and of each (head, products) gradient."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = (rng.random(n) < 0.5).astype(np.float64)
    sizes = np.array([d, 1])
    params = rng.normal(size=param_count(sizes)) * 0.1
    out = np.zeros(params.size + 2)
    runs = {"ceiling": lambda: read_sum(X.reshape(-1), X.dtype.type(0))}
    for prod in products:
        tag = "" if prod == "float64" else f" ({prod} products)"
        for name, head in (("linear", SQUARED), ("logistic", BINARY)):
            runs[name + tag] = lambda head=head, prod=prod: cpu.gradient(
                X, y, params, sizes, SIGMOID, head, out, prod
            )
    for run in runs.values():  # compile and warm up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(
    rounds: int = 9,
    n: int = TUNED_ROWS,
    d: int = 32,
    features: list[int] | None = None,
    mib: list[float] | None = None,
    products: list[str] | None = None,
) -> dict:
    """Print and return the median times (seconds): ``{(MiB or None, d): {run: seconds}}``, or,
    called with the defaults, the tuned shape's ``{run: seconds}`` alone."""
    features = features or [d]
    products = products or ["float64"]
    sizes = mib or [None]
    results = {}
    for size in sizes:
        for width in features:
            rows = n if size is None else max(8, int(size * (1 << 20)) // (4 * width))
            nbytes = rows * width * 4
            repeats = max(1, (64 << 20) // nbytes)
            med = time_shape(rows, width, rounds, products, repeats)
            results[(size, width)] = med
            gbps = nbytes / med["ceiling"] / 1e9
            print(
                f"{rows} x {width} float32 ({nbytes / (1 << 20):.1f} MiB), "
                f"{numba.get_num_threads()} threads, medians of {rounds} rounds"
                + (f" of {repeats} calls" if repeats > 1 else "")
            )
            print(f"  read ceiling {med['ceiling'] * 1e3:9.3f} ms  {gbps:6.1f} GB/s")
            for name, t in med.items():
                if name != "ceiling":
                    print(
                        f"  {name:34s} {t * 1e3:9.3f} ms  {nbytes / t / 1e9:6.1f} GB/s  "
                        f"ratio {med['ceiling'] / t:.2f}"
                    )
    if mib is None and len(features) == 1:
        return results[(None, features[0])]
    return results


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lepton_hpc.kernels.bench_cpu")
    p.add_argument("rounds", nargs="?", type=int, default=9, help="rounds of the rotation")
    p.add_argument("--features", type=_ints, default=[32], help="feature counts, e.g. 8,32,256")
    p.add_argument(
        "--mib", type=_floats, default=None, help="array sizes in MiB (default: 4M rows)"
    )
    p.add_argument("--products", type=_products, default=["float64"], help="float64 and/or float32")
    args = p.parse_args(argv)
    if args.rounds < 1 or any(f < 1 for f in args.features) or any(m <= 0 for m in args.mib or []):
        p.error("rounds, feature counts and sizes must be positive")
    return args


if __name__ == "__main__":
    a = _parse()
    main(a.rounds, features=a.features, mib=a.mib, products=a.products)

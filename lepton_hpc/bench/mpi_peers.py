"""Distributed peers under ``mpiexec -n k``, each against ours in the same job on the same rows:
Heat (its split=0 arrays, the gradient through ``ht.matmul``) and oneDAL (daal4py's logistic
loss/gradient per rank, then one mpi4py ``Allreduce``).

    mpiexec -n 2 python -m lepton_hpc.bench.mpi_peers heat   --x-bin X --y-bin Y --rows N ...
    mpiexec -n 2 python -m lepton_hpc.bench.mpi_peers onedal (same arguments)

Every rank loads its contiguous block of the data set's raw copy. Ours is the training path's
per-rank work: ``kernels.cpu.gradient`` on the block, then one ``Allreduce`` of the sums. Each
rank gets cores // ranks threads in every library. A peer that does not import is reported as
skipped with the reason.
"""

from __future__ import annotations

import statistics
import sys
import time
import types
from importlib import metadata

import numpy as np

from .common import bench_params, cores, figure, load_raw, part_parser, write_part

AGREE_TOL = 1e-4  # relative max-norm difference of the mean gradients allowed
HEAT_ROWS = 1_000_000  # Heat's X^T r by matmul takes seconds a call: its part uses the first rows


def _stub(name: str) -> types.ModuleType:
    """An empty module whose unknown attributes are placeholder classes (import-time only)."""
    mod = types.ModuleType(name)

    def attr(a: str):
        if a.startswith("__"):
            raise AttributeError(a)
        return type(a, (), {})

    mod.__getattr__ = attr  # type: ignore[method-assign]
    sys.modules[name] = mod
    return mod


def import_heat() -> tuple[object | None, str]:
    """(heat, note), or (None, why not). Heat imports torchvision only for its image-data helpers;
    when torchvision is missing it is stubbed in this process (the gradient never uses it)."""
    note = ""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = _stub("torchvision")
        for sub in ("datasets", "transforms", "io", "models", "ops"):
            setattr(tv, sub, _stub(f"torchvision.{sub}"))
        note = "torchvision is not installed: stubbed in the benchmark process for heat's import"
    try:
        import heat
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
        return None, f"import heat failed: {exc!r} (pip install heat)"
    return heat, note


def import_daal4py() -> tuple[object | None, str]:
    """(daal4py, note), or (None, why not). daal4py's ``__init__`` imports its scikit-learn
    patches, which fail on scikit-learn releases newer than it knows; the oneDAL kernels do not
    need them, so on that failure they are replaced by an empty module in this process."""
    try:
        import daal4py

        return daal4py, ""
    except ImportError as exc:
        first = repr(exc)
    for name in [m for m in sys.modules if m.startswith("daal4py")]:
        del sys.modules[name]
    sys.modules["daal4py.sklearn"] = types.ModuleType("daal4py.sklearn")
    try:
        import daal4py
    except Exception as exc:  # noqa: BLE001
        return None, f"import daal4py failed: {exc!r} (pip install daal4py)"
    note = f"daal4py.sklearn stubbed in the benchmark process (its import failed: {first[:160]})"
    return daal4py, note


def _block(rows: int, rank: int, size: int) -> tuple[int, int]:
    per, extra = divmod(rows, size)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def _rotate(comm, fns: dict, repeats: int) -> dict[str, float]:
    """Each function in turn, barrier-separated; the slowest rank's median per function."""
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(repeats + 1):  # the first round is warm-up
        for name, fn in fns.items():
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            if rep:
                samples[name].append(time.perf_counter() - t0)
    return {n: float(max(comm.allgather(statistics.median(s)))) for n, s in samples.items()}


def _ours(X, y, params, comm):
    """Our per-rank gradient plus one Allreduce: returns a call and where its sums land."""
    from mpi4py import MPI

    from ..kernels import BINARY, SIGMOID, cpu

    sizes = np.array([X.shape[1], 1], dtype=np.int64)
    out, tot = np.zeros(params.size + 2), np.zeros(params.size + 2)

    def call():
        cpu.gradient(X, y, params, sizes, SIGMOID, BINARY, out)
        comm.Allreduce(out, tot, op=MPI.SUM)

    return call, tot


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def heat_part(args) -> dict:
    """Heat's logistic gradient from split=0 arrays: X^T (sigmoid(X w + b) - y) / n."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    ht, note = import_heat()
    if ht is None:
        return {"skipped": note}
    import numba
    import torch

    threads = max(1, cores() // comm.size)
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    n = min(args.rows, HEAT_ROWS)
    start, stop = _block(n, comm.rank, comm.size)
    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features, start, stop)
    params = bench_params(args.features)
    Xh = ht.array(torch.from_numpy(X), is_split=0)
    yh = ht.array(torch.from_numpy(y.astype(np.float32)).reshape(-1, 1), is_split=0)
    w = ht.array(params[:-1].astype(np.float32).reshape(-1, 1))
    b = float(params[-1])
    got = {}

    def grads(gw, r):
        got["g"] = (gw, ht.sum(r))

    def residual():
        return 1.0 / (1.0 + ht.exp(-(ht.matmul(Xh, w) + b))) - yh

    def heat_matmul():  # X^T r as written in the linear-algebra API: (split 1) @ (split 0)
        r = residual()
        grads(ht.matmul(Xh.T, r), r)

    def heat_bsum():  # the same sum by broadcasting: sum over the split axis, one allreduce
        r = residual()
        grads(ht.sum(Xh * r, axis=0), r)

    ours, tot = _ours(X, y, params, comm)
    fns = {"heat_matmul": heat_matmul, "heat_bsum": heat_bsum, "ours": ours}
    med = _rotate(comm, fns, min(args.repeats, 3))
    g_ours = tot[: params.size] / tot[-1]
    diffs = {}
    for name in ("heat_matmul", "heat_bsum"):
        fns[name]()
        gw, gb = got["g"]
        g_heat = np.r_[gw.numpy().ravel(), float(gb.item())] / n
        diffs[name] = _rel(g_heat, g_ours)
    if max(diffs.values()) > AGREE_TOL:
        raise RuntimeError(f"heat and ours disagree on the gradient: {diffs}")
    best = min(med["heat_matmul"], med["heat_bsum"])
    return {
        "heat": ht.__version__,
        "ranks": comm.size,
        "threads_per_rank": threads,
        "note": note,
        "rows": n,
        "gradient_rel_diff": diffs,
        "agree": max(diffs.values()) <= AGREE_TOL,
        "figures": {
            "heat_matmul_s": figure(med["heat_matmul"], "s", note="ht.matmul(X.T, r)"),
            "heat_bsum_s": figure(med["heat_bsum"], "s", note="ht.sum(X * r, axis=0)"),
            "heat_s": figure(best, "s", note="the faster of the two, all ranks"),
            "ours_s": figure(med["ours"], "s", note="kernels.cpu.gradient + one Allreduce"),
        },
    }


def onedal_part(args) -> dict:
    """daal4py's logistic loss/gradient (float32) on each rank's rows, then one Allreduce."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    d4p, note = import_daal4py()
    if d4p is None:
        return {"skipped": note}
    import numba

    threads = max(1, cores() // comm.size)
    d4p.daalinit(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    start, stop = _block(args.rows, comm.rank, comm.size)
    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features, start, stop)
    params = bench_params(args.features)
    m = X.shape[0]
    y32 = y.astype(np.float32).reshape(-1, 1)
    w32 = np.r_[params[-1], params[:-1]].astype(np.float32).reshape(-1, 1)  # intercept first
    algo = d4p.optimization_solver_logistic_loss(
        numberOfTerms=m, resultsToCompute="value|gradient", interceptFlag=True, fptype="float"
    )
    part, tot = np.zeros(params.size + 2), np.zeros(params.size + 2)

    def onedal():
        res = algo.compute(X, y32, w32)
        g = np.asarray(res.gradientIdx, dtype=np.float64).ravel() * m  # mean -> sum
        part[:-3], part[-3] = g[1:], g[0]
        part[-2], part[-1] = float(np.asarray(res.valueIdx).ravel()[0]) * m, m
        comm.Allreduce(part, tot, op=MPI.SUM)

    ours, tot_ours = _ours(X, y, params, comm)
    med = _rotate(comm, {"onedal": onedal, "ours": ours}, args.repeats)
    g_dal, g_ours = tot[:-2] / tot[-1], tot_ours[:-2] / tot_ours[-1]
    if _rel(g_dal, g_ours) > AGREE_TOL:
        raise RuntimeError(f"oneDAL and ours disagree on the gradient: {_rel(g_dal, g_ours)}")
    return {
        "daal4py": metadata.version("daal4py"),
        "ranks": comm.size,
        "rows": args.rows,
        "threads_per_rank": threads,
        "note": note,
        "gradient_rel_diff": _rel(g_dal, g_ours),
        "loss_rel_diff": abs(tot[-2] - tot_ours[-2]) / abs(tot_ours[-2]),
        "agree": _rel(g_dal, g_ours) <= AGREE_TOL,
        "figures": {
            "onedal_s": figure(med["onedal"], "s", note="logistic_loss per rank + Allreduce"),
            "ours_s": figure(med["ours"], "s", note="kernels.cpu.gradient + one Allreduce"),
        },
    }


PARTS = {"heat": heat_part, "onedal": onedal_part}


def main() -> None:
    args = part_parser(__doc__).parse_args()
    result = PARTS[args.part](args)
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        write_part(args.out, result)


if __name__ == "__main__":
    main()

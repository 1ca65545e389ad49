"""The peers, each timed on the same rows as ours: PyTorch (CPU, and DDP over gloo), scikit-learn,
and Horovod's allreduce. Optional extras: a peer that does not import is reported as skipped.

    python -m lepton_hpc.bench.peers torch   --x-bin X --y-bin Y --rows N --features D --out J
    python -m lepton_hpc.bench.peers sklearn (same arguments)
    mpiexec -n k python -m lepton_hpc.bench.peers ddp --port P (same arguments)
    mpiexec -n k python -m lepton_hpc.bench.peers horovod --features D --out J

Under mpiexec the rank and world size come from Open MPI's launcher variables; nothing here
initialises MPI through mpi4py (DDP rendezvous over TCP on 127.0.0.1, Horovod its own MPI).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import numpy as np

from ..data.reader import row_block
from .common import (
    GLOBAL_BATCH,
    L2,
    bench_params,
    buffer_sizes,
    cores,
    figure,
    launcher_rank_size,
    load_raw,
    part_parser,
    repeats_for,
    time_it,
    time_rotating,
    write_part,
)


def threads_per_rank(size: int) -> int:
    """The node's cores shared by its ranks, within this process's CPU binding."""
    return max(1, min((os.cpu_count() or 1) // size, cores()))


# ---- PyTorch on the CPU, one process --------------------------------------------------------
def torch_cpu(args) -> dict:
    """Logistic gradient in float32 with all threads: by hand (two BLAS passes) and by autograd."""
    import torch
    from torch.nn import functional

    torch.set_num_threads(threads_per_rank(1))
    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32))
    p = torch.from_numpy(bench_params(args.features).astype(np.float32))
    w, b = p[:-1].clone(), p[-1:].clone()
    n = X.shape[0]
    grads = {}

    def manual():
        with torch.no_grad():
            z = torch.mv(Xt, w) + b
            r = torch.sigmoid(z) - yt
            loss = functional.binary_cross_entropy_with_logits(z, yt, reduction="sum")
            grads["manual"] = (torch.cat([torch.mv(Xt.t(), r), r.sum().reshape(1)]), loss)

    wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()

    def autograd():
        wa.grad = ba.grad = None
        loss = functional.binary_cross_entropy_with_logits(Xt @ wa + ba, yt, reduction="sum")
        loss.backward()
        grads["autograd"] = (torch.cat([wa.grad, ba.grad]), loss.detach())

    stats = time_rotating({"manual": manual, "autograd": autograd}, args.repeats)
    g, loss = grads["manual"]
    figures = {}
    for name, s in stats.items():
        figures[f"torch_{name}_s"] = figure(s["median_s"], "s")
        figures[f"torch_{name}_rows_per_s"] = figure(n / s["median_s"], "rows/s")
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "timings": stats,
        "figures": figures,
        "gradient": (g.double() / n).tolist(),
        "loss": float(loss) / n,
    }


# ---- PyTorch DDP over gloo, under mpiexec ---------------------------------------------------
def _max_over_ranks(dist, torch, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def ddp(args) -> dict | None:
    """Full-batch and mini-batch (global batch 4,096) epochs of DDP logistic regression; at more
    than one rank also gloo's allreduce latency by buffer size."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, size = launcher_rank_size()
    torch.set_num_threads(threads_per_rank(size))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=size
    )
    start, stop = row_block(args.rows, rank, size)
    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features, start, stop)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32))
    model = torch.nn.Linear(args.features, 1)
    p = torch.from_numpy(bench_params(args.features).astype(np.float32))
    with torch.no_grad():
        model.weight.copy_(p[:-1].reshape(1, -1))
        model.bias.copy_(p[-1:])
    net = DistributedDataParallel(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")

    def step(xb, yb, global_rows: int) -> None:
        opt.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks: scale so the result is the global mean.
        loss = loss_fn(net(xb).squeeze(1), yb) * (size / global_rows)
        loss.backward()
        opt.step()

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return _max_over_ranks(dist, torch, time.perf_counter() - t0)

    full = [timed(lambda: step(Xt, yt, args.rows)) for _ in range(args.repeats + 1)][1:]

    local_batch = row_block(GLOBAL_BATCH, rank, size)
    lb = local_batch[1] - local_batch[0]
    steps = min(args.rows // GLOBAL_BATCH, (stop - start) // lb)
    gen = torch.Generator().manual_seed(rank)

    def epoch(n_steps: int) -> None:
        perm = torch.randperm(stop - start, generator=gen)
        for s in range(n_steps):
            idx = perm[s * lb : (s + 1) * lb]
            step(Xt.index_select(0, idx), yt.index_select(0, idx), GLOBAL_BATCH)

    timed(lambda: epoch(min(steps, 10)))  # warm-up
    mini = [timed(lambda: epoch(steps)) for _ in range(max(1, args.repeats // 2))]
    result = {
        "ranks": size,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps_per_epoch": steps,
        "local_batch": lb,
        "timings": {"full_epoch_s": full, "minibatch_epoch_s": mini},
        "figures": {
            "ddp_full_epoch_s": figure(statistics.median(full), "s"),
            "ddp_minibatch_epoch_s": figure(statistics.median(mini), "s"),
            "ddp_minibatch_step_s": figure(statistics.median(mini) / steps, "s"),
        },
    }
    if size > 1:
        result["allreduce"] = _gloo_sweep(dist, torch, args)
    dist.destroy_process_group()
    return result if rank == 0 else None


def _gloo_sweep(dist, torch, args) -> list[dict]:
    """Median seconds of one gloo all_reduce (sum, float64) per buffer size, max over ranks."""
    rows = []
    train_bytes = 8 * (args.features + 5)  # ours: [gradient (d + 1), loss, rows, stop, step]
    for nbytes in sorted({*buffer_sizes(args.sizes), train_bytes}):
        t = torch.ones(max(1, nbytes // 8), dtype=torch.float64)
        reps = max(5, repeats_for(nbytes, args.repeats) // 2)
        for _ in range(5):
            dist.all_reduce(t)
        dist.barrier()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        med = _max_over_ranks(dist, torch, statistics.median(samples))
        rows.append({"bytes": nbytes, "median_s": med, "repeats": reps})
    return rows


# ---- Horovod, under mpiexec -----------------------------------------------------------------
def horovod(args) -> dict | None:
    """Horovod's in-place allreduce (MPI underneath) per buffer size, max over ranks."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    rows = []
    train_bytes = 8 * (args.features + 5)
    for nbytes in sorted({*buffer_sizes(args.sizes), train_bytes}):
        t = torch.ones(max(1, nbytes // 8), dtype=torch.float64)
        reps = max(5, repeats_for(nbytes, args.repeats) // 2)
        for _ in range(5):
            hvd.allreduce_(t, op=hvd.Sum, name="bench")
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            hvd.allreduce_(t, op=hvd.Sum, name="bench")
            samples.append(time.perf_counter() - t0)
        med = hvd.allreduce(torch.tensor([statistics.median(samples)]), op=hvd.Max)
        rows.append({"bytes": nbytes, "median_s": float(med[0]), "repeats": reps})
    rank = hvd.rank()
    result = {"ranks": hvd.size(), "allreduce": rows, "train_buffer_bytes": train_bytes}
    hvd.shutdown()
    return result if rank == 0 else None


# ---- scikit-learn ---------------------------------------------------------------------------
def objective(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l2: float) -> float:
    """Mean logistic loss + l2/2 |w|^2 in float64 (the objective of ours and of sklearn's fit)."""
    total, chunk = 0.0, 1 << 18
    for s in range(0, X.shape[0], chunk):
        z = X[s : s + chunk].astype(np.float64) @ w + b
        total += float(np.sum(np.logaddexp(0.0, z) - y[s : s + chunk] * z))
    return total / X.shape[0] + 0.5 * l2 * float(w @ w)


def sklearn(args) -> dict:
    """SGDClassifier for one epoch; LogisticRegression (lbfgs) to its optimum and the loss there."""
    import sklearn as sk
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    X, y = load_raw(args.x_bin, args.y_bin, args.rows, args.features)
    n = X.shape[0]
    warnings.simplefilter("ignore", ConvergenceWarning)
    sgd = SGDClassifier(loss="log_loss", alpha=L2, max_iter=1, tol=None, random_state=0)
    sgd_stats = time_it(lambda: sgd.fit(X, y), max(1, args.repeats // 2), warmup=0)
    lr = LogisticRegression(C=1.0 / (L2 * n), solver="lbfgs", max_iter=1000)
    lr_stats = time_it(lambda: lr.fit(X, y), max(1, args.repeats // 3), warmup=0)
    w, b = lr.coef_.ravel().astype(np.float64), float(lr.intercept_[0])
    return {
        "sklearn": sk.__version__,
        "timings": {"sgd_epoch": sgd_stats, "lbfgs_fit": lr_stats},
        "lbfgs_iterations": int(lr.n_iter_[0]),
        "lbfgs_objective": objective(X, y, w, b, L2),
        "l2": L2,
        "C": 1.0 / (L2 * n),
        "figures": {
            "sklearn_sgd_epoch_s": figure(sgd_stats["median_s"], "s"),
            "sklearn_lbfgs_fit_s": figure(lr_stats["median_s"], "s"),
        },
    }


PARTS = {"torch": torch_cpu, "ddp": ddp, "horovod": horovod, "sklearn": sklearn}


def main() -> None:
    args = part_parser(__doc__).parse_args()
    try:
        result = PARTS[args.part](args)
    except ImportError as exc:  # a peer that is absent or broken is skipped, with the reason
        if launcher_rank_size()[0] == 0:
            write_part(args.out, {"skipped": f"{args.part}: {exc}"})
        return
    if result is not None:  # rank 0 of an mpiexec job, or a single process
        write_part(args.out, result)


if __name__ == "__main__":
    main()

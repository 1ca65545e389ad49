"""In-process parts on generated data: the feature-count sweep of the logistic gradient against
the read ceiling, the same on AVX2-only code, and MLP training steps against PyTorch.

    python -m lepton_hpc.bench.kernel_parts dsweep --sizes 8,16,...,1024 --bytes B --out J
    NUMBA_CPU_NAME=haswell python -m lepton_hpc.bench.kernel_parts avx2 --sizes 8,32,256 ...
    python -m lepton_hpc.bench.kernel_parts mlp --rows N --repeats R --out J

``dsweep``/``avx2`` make, for each feature count d, a float32 X of about ``--bytes`` bytes (rows =
bytes / 4d) and time in rotation the slice-based all-core read of X (``micro.read_sum``, the
ceiling) and ``kernels.cpu.gradient`` on it, as the ``memory`` part does for the data set; for
rows wider than the 4-feature panels (40 features) also with ``train.products = "float32"``
(``ours32``). Under ``NUMBA_CPU_NAME`` the toolkit's own check (``kernels.native.supported``)
decides whether the tuned kernels run (``ours``); ``avx2`` records its answer and the features of
the code, times the tuned kernels (``tuned``: ours where the check chose them, else forced on)
and the generic reference kernels (``generic``: what such a CPU ran before the check knew named
CPUs).

Numba's JIT applies the host's feature list over the named CPU unless ``NUMBA_CPU_FEATURES`` is
set, so ``NUMBA_CPU_NAME=haswell`` alone still compiles AVX-512 code on an AVX-512 host; ``avx2``
sets ``NUMBA_CPU_FEATURES=""`` (the named CPU's own features) when it is not set.

``mlp`` times one full-batch training step (gradient through the CPU device, then Adam) and one
mini-batch epoch of ours and of a ``torch.nn.Sequential`` of the same widths, loss and optimiser,
with the same thread count, after checking that both compute the same loss and gradient.
"""

from __future__ import annotations

import dataclasses
import itertools
import types

import numpy as np

from .common import cores, figure, part_parser, summary, time_it, time_rotating, write_part

SWEEP_D = (8, 16, 32, 64, 128, 256, 512, 1024)
AVX2_D = (8, 32, 256)
SWEEP_TRAIN_D = (8, 32, 256)  # feature counts also timed as lepton train epochs at 2 ranks
# kernels.cpu.PANEL4_WIDTH (a test checks): wider float32 rows are also timed with float32 products
FLOAT32_WIDTH = 40
SWEEP32_D = tuple(d for d in SWEEP_D if d > FLOAT32_WIDTH)
SWEEP_TRAIN32_D = tuple(d for d in SWEEP_TRAIN_D if d > FLOAT32_WIDTH)
MLP_ROWS, MLP_QUICK_ROWS = 1_000_000, 100_000  # full-batch rows at most (fewer for big nets)
SWEEP_BYTES = 256 << 20  # X of about 256 MB per feature count
QUICK_SWEEP_BYTES = 64 << 20  # above a 32 MiB L3: still a read from memory
MLP_CASES = ((32, (64, 32)), (256, (64, 32)), (32, (256, 256)), (256, (256, 256)))
MLP_BATCH = 256
AGREE_TOL = 1e-4  # relative difference of loss and gradient allowed between ours and torch


def mlp_tag(d: int, hidden) -> str:
    """The name of one MLP configuration in figure and ratio keys: ``d32_h64x32``."""
    return f"d{d}_h{'x'.join(map(str, hidden))}"


def sweep_rows(d: int, nbytes: int) -> int:
    """Rows of a float32 X with ``d`` features in about ``nbytes`` bytes (a multiple of 64)."""
    return max(64, nbytes // (4 * d) // 64 * 64)


def logistic_data(rows: int, d: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal float32 X (64-byte aligned, as training has it) and 0/1 float64 labels."""
    from ..data.reader import aligned_empty

    rng = np.random.default_rng(seed)
    X = aligned_empty((rows, d), np.float32)
    step = max(1, (1 << 22) // d)
    for s in range(0, rows, step):
        X[s : s + step] = rng.standard_normal((min(step, rows - s), d), dtype=np.float32)
    y = (rng.random(rows) < 0.5).astype(np.float64)
    return X, y


def kernel_sweep(args) -> dict:
    """Read ceiling and our logistic gradient for each feature count, all cores, in rotation."""
    import numba

    from ..kernels import BINARY, SIGMOID, cpu, native, reference
    from .micro import read_sum

    threads = min(cores(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    ok, why = native.supported()
    avx2 = args.part == "avx2"
    forced = avx2 and not ok
    sizes_d = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SWEEP_D)
    figures, rows_used, timings, checks = {}, {}, {}, {}
    for d in sizes_d:
        rows = sweep_rows(d, args.bytes)
        X, y = logistic_data(rows, d)
        flat = X.reshape(-1)
        params = np.random.default_rng(12345).normal(size=d + 1) * 0.1
        sizes = np.array([d, 1], dtype=np.int64)
        out = np.zeros(d + 3)
        fns = {
            "ceiling": lambda flat=flat: read_sum(flat, flat.dtype.type(0)),
            "ours": lambda X=X, y=y, p=params, s=sizes, o=out: cpu.gradient(
                X, y, p, s, SIGMOID, BINARY, o
            ),
        }
        if d > FLOAT32_WIDTH:  # train.products = "float32": float32 products on wide rows
            fns["ours32"] = lambda X=X, y=y, p=params, s=sizes, o=out: cpu.gradient(
                X, y, p, s, SIGMOID, BINARY, o, "float32"
            )
        if forced:  # the tuned kernels, compiled for the named CPU, whatever the check says
            native_supported = native.supported

            def tuned(X=X, y=y, p=params, s=sizes, o=out, orig=native_supported):
                native.supported = lambda: (True, "forced on by the bench")
                try:
                    cpu.gradient(X, y, p, s, SIGMOID, BINARY, o)
                finally:
                    native.supported = orig

            fns["tuned"] = tuned
        if avx2:  # the generic kernels on the same code: the figure before the check chose tuned
            fns["generic"] = lambda X=X, y=y, p=params, s=sizes, o=out: reference.gradient(
                X, y, p, s, SIGMOID, BINARY, o
            )
        stats = time_rotating(fns, args.repeats)
        if avx2 and ok:  # the toolkit's own choice is the tuned kernels: one timing for both
            stats["tuned"] = stats["ours"]
        checks[str(d)] = _agreement(fns, out, X, y, params)
        timings[str(d)] = stats
        rows_used[str(d)] = rows
        for name, st in stats.items():
            figures[f"{name}_s_d{d}"] = figure(st["median_s"], "s", rows=rows, features=d)
            figures[f"{name}_best_s_d{d}"] = figure(st["min_s"], "s", note="fastest repeat")
            figures[f"{name}_GBps_d{d}"] = figure(X.nbytes / st["median_s"] / 1e9, "GB/s")
        del X, y, flat
    named_cpu = native.numba_target()[0] is not None
    code = native.target_features()
    return {
        "threads": threads,
        "threading_layer": numba.threading_layer(),
        "cpu_name": numba.config.CPU_NAME or "host",
        "cpu_features_env": numba.config.CPU_FEATURES if named_cpu else None,
        "code_features": {f: bool(code.get(f, False)) for f in native.PROBED_FEATURES},
        "native_supported": [bool(ok), why],
        "tuned_forced": forced,
        "bytes_X": args.bytes,
        "rows": rows_used,
        "features": sizes_d,
        "gradient_vs_numpy_f64": checks,
        "timings": timings,
        "figures": figures,
    }


def _agreement(fns: dict, out: np.ndarray, X, y, params) -> dict[str, float]:
    """Each timed gradient's largest difference from NumPy's float64 one (relative to its
    largest component), on the whole array: a sweep that timed wrong math would be worthless."""
    from .micro import reference_gradient

    g_ref, _ = reference_gradient(X.astype(np.float64), y, params)
    found = {}
    for name in ("ours", "ours32", "tuned", "generic"):
        if name in fns:
            fns[name]()
            g = out[:-2] / out[-1]
            found[name] = float(np.max(np.abs(g - g_ref)) / np.max(np.abs(g_ref)))
            if found[name] > 1e-4:
                raise RuntimeError(f"{name} gradient differs from NumPy float64 by {found[name]}")
    return found


# ---- MLP: ours against torch ---------------------------------------------------------------
def mlp_params(sizes: list[int], seed: int = 3) -> np.ndarray:
    """He-initialised flat parameters in the kernels' layout (W_l row-major in x out, then b_l)."""
    rng = np.random.default_rng(seed)
    chunks = []
    for a, b in itertools.pairwise(sizes):
        chunks += [rng.normal(size=a * b) * np.sqrt(2.0 / a), rng.normal(size=b) * 0.01]
    return np.concatenate(chunks)


def torch_model(sizes: list[int], params: np.ndarray, dtype: str = "float32"):
    """``nn.Sequential`` of Linear/ReLU with the same widths, its weights taken from ``params``
    (torch keeps W as out x in: our W_l transposed)."""
    import torch
    from torch import nn

    tdtype = getattr(torch, dtype)
    layers, at = [], 0
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b, dtype=tdtype)
        with torch.no_grad():
            W = params[at : at + a * b].reshape(a, b)
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(params[at + a * b : at + a * b + b]))
        at += a * b + b
        layers += [lin] if i == len(sizes) - 2 else [lin, nn.ReLU()]
    if at != params.size:
        raise ValueError(f"{params.size} parameters for widths {sizes}: expected {at}")
    return nn.Sequential(*layers)


def torch_flat_grad(model) -> np.ndarray:
    """The torch model's gradient in the kernels' flat layout."""
    out = []
    for m in model:
        if hasattr(m, "weight"):
            out += [m.weight.grad.numpy().T.ravel(), m.bias.grad.numpy().ravel()]
    return np.concatenate(out).astype(np.float64)


def mlp_rows(sizes: list[int], cap: int, flop_budget: float) -> int:
    """Rows for one timed pass: ``cap``, fewer when forward+backward would exceed the budget."""
    from ..kernels import param_count

    per_row = 6.0 * param_count(sizes)
    return int(max(MLP_BATCH * 4, min(cap, flop_budget // per_row)) // MLP_BATCH * MLP_BATCH)


def mlp(args) -> dict:
    """Full-batch step and mini-batch epoch, ours and torch, each configuration in turn."""
    import numba
    import torch

    from ..device import Device
    from ..kernels import cpu

    threads = min(cores(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    dev = Device("cpu", cpu, threads=threads)
    quick = args.rows < 1_000_000
    full_cap, mini_cap = args.rows, (8_192 if quick else 131_072)
    budget = 5e9 if quick else 5e10  # flops of one timed pass (forward + backward)
    cases, figures = [], {}
    for d, hidden in MLP_CASES:
        n_full = mlp_rows([d, *hidden, 1], full_cap, budget)
        n_mini = mlp_rows([d, *hidden, 1], mini_cap, budget)
        case = _mlp_case(d, hidden, n_full, n_mini, dev, 2)  # steps of seconds: 2 timed
        figures.update(case.pop("figures"))
        cases.append(case)
    return {
        "threads": threads,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "activation": "relu",
        "loss": "logistic (BCE with logits), mean over rows",
        "optimizer": "Adam lr 1e-3, betas (0.9, 0.999), eps 1e-8",
        "cases": cases,
        "figures": figures,
    }


def _mlp_case(d: int, hidden, n_full: int, n_mini: int, dev, reps_full: int) -> dict:
    """One MLP configuration: the agreement check, then ours and torch timed."""
    import torch

    from ..kernels import BINARY, RELU
    from ..optim import Adam

    adam_cfg = types.SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    sizes = [d, *hidden, 1]
    tag = mlp_tag(d, hidden)
    X, y = logistic_data(max(n_full, n_mini), d, seed=d)
    sizes_a = np.array(sizes, dtype=np.int64)
    p0 = mlp_params(sizes)
    P = p0.size
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32)).reshape(-1, 1)
    lossf = torch.nn.BCEWithLogitsLoss()

    # the same math: loss and gradient at the same parameters on the same rows
    out = np.zeros(P + 2)
    dev.gradient(X[:n_full], y[:n_full], p0, sizes_a, RELU, BINARY, out)
    ours_loss, ours_g = out[P] / out[P + 1], out[:P] / out[P + 1]
    model = torch_model(sizes, p0)
    loss = lossf(model(Xt[:n_full]), yt[:n_full])
    loss.backward()
    t_g = torch_flat_grad(model)
    agree = {
        "loss_ours": float(ours_loss),
        "loss_torch": float(loss.item()),
        "loss_rel_diff": abs(float(loss.item()) - ours_loss) / abs(ours_loss),
        "grad_rel_diff": float(np.max(np.abs(t_g - ours_g)) / np.max(np.abs(ours_g))),
    }
    if agree["loss_rel_diff"] > AGREE_TOL or agree["grad_rel_diff"] > AGREE_TOL:
        raise RuntimeError(f"ours and torch disagree on {tag}: {agree}")

    dev32 = dataclasses.replace(dev, products="float32")  # train.products = "float32"
    out32 = np.zeros(P + 2)
    dev32.gradient(X[:n_full], y[:n_full], p0, sizes_a, RELU, BINARY, out32)
    agree["grad32_rel_diff"] = float(
        np.max(np.abs(out32[:P] / out32[P + 1] - ours_g)) / np.max(np.abs(ours_g))
    )

    def ours_runner(n: int, batch: int, device=dev):
        params, opt, buf = p0.copy(), Adam(P, adam_cfg), np.zeros(P + 2)

        def epoch():
            for s in range(0, n, batch):
                xb, yb = X[s : s + batch], y[s : s + batch]
                device.gradient(xb, yb, params, sizes_a, RELU, BINARY, buf)
                opt.step_sums(params, buf[:P], buf[P + 1])  # the mean in the update's pass

        return epoch

    def torch_runner(n: int, batch: int):
        net = torch_model(sizes, p0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)

        def epoch():
            for s in range(0, n, batch):
                opt.zero_grad(set_to_none=True)
                lossf(net(Xt[s : s + batch]), yt[s : s + batch]).backward()
                opt.step()

        return epoch

    # each library's calls back to back (not interleaved): their thread pools do not share
    stats = {
        "ours_full": time_it(ours_runner(n_full, n_full), reps_full),
        "torch_full": time_it(torch_runner(n_full, n_full), reps_full),
        "ours_mini": _warm_epoch(ours_runner(n_mini, MLP_BATCH), ours_runner(256 * 8, 256)),
        "ours32_full": time_it(ours_runner(n_full, n_full, dev32), reps_full),
        "ours32_mini": _warm_epoch(
            ours_runner(n_mini, MLP_BATCH, dev32), ours_runner(256 * 8, 256, dev32)
        ),
        "torch_mini": _warm_epoch(torch_runner(n_mini, MLP_BATCH), torch_runner(256 * 8, 256)),
    }
    figures = {}
    for name, st in stats.items():
        figures[f"{name}_s_{tag}"] = figure(
            st["median_s"],
            "s",
            rows=n_full if name.endswith("full") else n_mini,
            what="one full-batch step" if name.endswith("full") else "one epoch, batch 256",
        )
    return {
        "features": d,
        "hidden": list(hidden),
        "tag": tag,
        "rows_full_batch": n_full,
        "rows_minibatch_epoch": n_mini,
        "agreement": agree,
        "timings": stats,
        "figures": figures,
    }


def _warm_epoch(epoch, warm) -> dict:
    """One timed epoch after a short warm-up epoch of the same kind."""
    import time

    warm()
    t0 = time.perf_counter()
    epoch()
    return summary([time.perf_counter() - t0])


PARTS = {"dsweep": kernel_sweep, "avx2": kernel_sweep, "mlp": mlp}


def main() -> None:
    import os
    import sys

    p = part_parser(__doc__)
    p.add_argument("--bytes", type=int, default=SWEEP_BYTES)
    args = p.parse_args()
    if args.part == "avx2" and os.environ.get("NUMBA_CPU_FEATURES") is None:
        os.environ["NUMBA_CPU_FEATURES"] = ""  # the named CPU's own features
        if "numba" in sys.modules:  # read again, should Numba have been imported already
            sys.modules["numba"].core.config.reload_config()
    try:
        result = PARTS[args.part](args)
    except ImportError as exc:  # torch (the mlp part's peer) absent or broken: skipped
        result = {"skipped": f"{args.part}: {exc}"}
    write_part(args.out, result)


if __name__ == "__main__":
    main()

"""The tensor-parallel rows of ``lepton bench``: an MLP [256 -> 4096 -> 4096 -> 10] trained
full batch with Adam on 2 ranks as a 1 x 2 grid (``comm.tensor_ranks = 2``: each rank holds half
of every split layer) and as a 2 x 1 grid (``comm.tensor_ranks = 1``: data parallelism, every
rank holds the whole model), with the same sliced kernels, so only the split differs.

Figures per grid (from each run's results.json): the parameters and optimiser state a rank
holds (``memory.model_mb``), its peak resident memory, the steady epoch, and per epoch the
compute, communication, evaluation and checkpoint seconds (the run's totals over its epochs).

Where the crossover lies. Per step, with a ring allreduce of n bytes over p ranks costing
``2 (p - 1) alpha + 2 (p - 1) / p * n / beta``:

- the 2 x 1 grid sums the whole gradient: n = 8 P bytes (P parameters);
- the 1 x 2 grid sums, for its one layer pair, the row-parallel layer's partial outputs: n = 8 B w
  bytes (B rows in the step, w = 4096 the pair's output width; the first pair needs no backward
  sum: X has no gradient).

Both are allreduces over 2 ranks, so on one node the tensor grid moves less whenever
``B w < P``: the crossover batch is ``P / w`` rows per step, whatever the node's bandwidth. The
multi-node estimate takes N nodes of 2 ranks, a network of latency ``NET_ALPHA_S`` and bandwidth
``NET_BETA_BPS`` (100 Gb/s InfiniBand), and the node's own bandwidth measured here (the 1 x 2
run's bytes over its communication time): data parallelism over all 2N ranks sums 8 P bytes
across the network; the hybrid grid N x 2 sums 8 (B / N) w bytes inside each node and 8 P / 2
bytes across the N nodes. The batch at which the two costs meet is reported; compute is the same
in both (the same rows and products per rank), so communication decides.
"""

from __future__ import annotations

import itertools

from .common import figure

FEATURES, CLASSES = 256, 10
HIDDEN = (4096, 4096)
ROWS, QUICK_ROWS = 2048, 256
EPOCHS, QUICK_EPOCHS = 4, 2
GRIDS = {"tensor_1x2": 2, "tensor_2x1": 1}  # run name -> comm.tensor_ranks (on 2 ranks)
NET_ALPHA_S = 2e-6  # the network model of the multi-node estimate: latency per message
NET_BETA_BPS = 12.5e9  # and bandwidth (100 Gb/s InfiniBand)
NODES = 4  # the multi-node estimate's node count (2 ranks each)


def shape(quick: bool) -> tuple[int, int]:
    """Rows of the data set and epochs of each run."""
    return (QUICK_ROWS, QUICK_EPOCHS) if quick else (ROWS, EPOCHS)


def sizes() -> tuple[int, ...]:
    return (FEATURES, *HIDDEN, CLASSES)


def n_params() -> int:
    s = sizes()
    return sum(a * b + b for a, b in itertools.pairwise(s))


def overrides(k: int, epochs: int) -> list[str]:
    """The ``lepton train`` overrides of a grid with ``k`` tensor ranks."""
    return [
        "model.kind=mlp",
        f"model.hidden=[{', '.join(map(str, HIDDEN))}]",
        "model.parallel=tensor",
        f"comm.tensor_ranks={k}",
        "optim.name=adam",
        "optim.lr=0.0003",
        "train.batch_size=0",
        f"train.epochs={epochs}",
    ]


def add_figures(entry: dict, rows: int, k: int) -> None:
    """Per-epoch split and bytes per step of one grid's run (in place)."""
    res = entry["results"]
    figs, t, epochs = res["figures"], res["timing"], max(1, res["epochs"])
    steps = max(1, res["steps"])
    for key in ("compute", "comm", "eval", "checkpoint"):
        figs[f"{key}_per_epoch_s"] = figure(
            t.get(f"{key}_s", 0.0) / epochs, "s", note="the run's total over its epochs"
        )
    per_step = 8 * (rows * HIDDEN[1] if k > 1 else n_params())
    figs["comm_bytes_per_step"] = figure(per_step, "bytes", note="the allreduce's payload")
    comm_step = t.get("comm_s", 0.0) / steps
    if comm_step > 0:
        figs["comm_GBps"] = figure(per_step / comm_step / 1e9, "GB/s", note="payload / comm time")


def _ring(nbytes: float, p: int, alpha: float, beta: float) -> float:
    return 0.0 if p < 2 else 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / beta


def crossover(parts: dict) -> dict:
    """The crossover batch on one node, and the multi-node estimate (see the module)."""
    P, w = n_params(), HIDDEN[1]
    out = {"one_node_crossover_rows": figure(P / w, "rows per step", note="P / w")}
    tp = parts.get("tensor_1x2", {})
    if tp.get("status") != "ok" or "comm_GBps" not in tp["results"]["figures"]:
        return out
    beta_node = tp["results"]["figures"]["comm_GBps"]["value"] * 1e9
    n = NODES
    dp = _ring(8 * P, 2 * n, NET_ALPHA_S, NET_BETA_BPS)  # data parallel over every rank
    fixed = _ring(8 * P / 2, n, NET_ALPHA_S, NET_BETA_BPS)  # hybrid: half the model, n nodes
    per_row = 8 * w / n / beta_node  # hybrid: the in-node sum, per global row of the step
    rows = (dp - fixed) / per_row if dp > fixed else 0.0
    out["multi_node_crossover_rows"] = figure(
        rows,
        "rows per step (global batch)",
        nodes=n,
        ranks_per_node=2,
        network=f"alpha {NET_ALPHA_S * 1e6:g} us, beta {NET_BETA_BPS / 1e9:g} GB/s",
        node_GBps=beta_node / 1e9,
        data_parallel_comm_s=dp,
        hybrid_fixed_comm_s=fixed,
    )
    return out


def section(parts: dict) -> list[str]:
    """The report's table for the two grids and the crossover."""
    runs = [(n, parts.get(n, {})) for n in GRIDS]
    runs = [(n, e) for n, e in runs if e.get("status") == "ok"]
    if not runs:
        return []
    mlp = " -> ".join(map(str, sizes()))
    lines = [
        "",
        f"## Tensor parallelism (MLP {mlp}, {n_params():,} parameters, Adam, full batch, 2 ranks)",
        "",
        (
            "| grid | params + optimizer per rank | peak resident | epoch | compute/epoch | "
            "comm/epoch | eval/epoch | checkpoint/epoch | comm payload/step |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in runs:
        f = entry["results"]["figures"]

        def v(key: str, fmt: str = "{:.3f} s", f: dict = f) -> str:
            return fmt.format(f[key]["value"]) if key in f else ""

        lines.append(
            f"| {name.removeprefix('tensor_')} | {v('model_mb', '{:.0f} MiB')} | "
            f"{v('peak_rss_mb', '{:.0f} MiB')} | {v('epoch_s')} | {v('compute_per_epoch_s')} | "
            f"{v('comm_per_epoch_s')} | {v('eval_per_epoch_s')} | "
            f"{v('checkpoint_per_epoch_s')} | "
            f"{f['comm_bytes_per_step']['value'] / 2**20:.0f} MiB |"
        )
    c = crossover(parts)
    lines += [
        "",
        (
            "On one node the 1 x 2 grid moves fewer bytes per step than the 2 x 1 grid below "
            f"{c['one_node_crossover_rows']['value']:,.0f} rows per step (P / w)."
        ),
    ]
    m = c.get("multi_node_crossover_rows")
    if m is not None:
        lines[-1] += (
            f" Estimated for {m['nodes']} nodes x 2 ranks ({m['network']}, the node's "
            f"{m['node_GBps']:.1f} GB/s measured here): the hybrid {m['nodes']} x 2 grid "
            f"communicates less than data parallelism below a global batch of "
            f"{m['value']:,.0f} rows (data parallel {m['data_parallel_comm_s'] * 1e3:.1f} ms "
            "a step)."
        )
    return lines

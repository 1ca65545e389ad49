"""Strategies without MPI: block-aligned partitions, block-ordered sums that do not depend on the
split, per-block scaler statistics, config checks, the Horovod install hint, and each strategy
(sync, overlap, local SGD, reproducible sync) on simulated ranks with the real kernels, checked
against a float64 NumPy reference."""

import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lepton_hpc.comm import make_backend
from lepton_hpc.comm.base import SerialComm
from lepton_hpc.config import OptimConfig, load_config
from lepton_hpc.data.preprocess import block_moments, fit_scaler, merge_moments
from lepton_hpc.data.reader import aligned_row_block, global_block_rows
from lepton_hpc.errors import ConfigError, LeptonError
from lepton_hpc.optim import make_optimizer
from lepton_hpc.training.strategies import (
    STRATEGIES,
    BlockOrderedReduction,
    StepOutcome,
    check_comm_config,
    check_step,
    make_strategy,
)
from tests.unit.training_fakes import (
    LINEAR,
    context,
    data,
    reference_gradient,
    reference_sums,
    run_ranks,
    with_reduction,
)


def test_block_rows_depend_on_the_file_only():
    assert global_block_rows(1) == 1
    assert global_block_rows(5001) == 79  # at least 64 blocks for small files
    assert global_block_rows(64 * 1024) == 1024
    assert global_block_rows(10**9) == 1024


@pytest.mark.parametrize("size", range(1, 6))
def test_aligned_blocks_cover_rows_with_whole_blocks(size):
    for n, B in itertools.product(range(1, 60), (1, 3, 7)):
        parts = [aligned_row_block(n, r, size, B) for r in range(size)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        for (_, a1), (b0, _) in itertools.pairwise(parts):
            assert a1 == b0
        assert all(a % B == 0 or a == n for a, _ in parts)  # starts on a block boundary
        blocks = [-(-(b - a) // B) for a, b in parts]
        if n >= size * B:
            assert max(blocks) - min(blocks) <= 1


class GatherOf(SerialComm):
    """Stands in for ``size`` ranks whose allgather contributions were computed beforehand."""

    def __init__(self, items):
        self.items = items
        self.size = len(items)

    def allgather(self, obj):  # every rank's object is already in items
        return self.items


def sequential_kernel(X, y, params, out):
    """Order-sensitive float64 sums (a Python loop), like a real kernel's accumulation."""
    out[:] = 0.0
    for x, t in zip(X, y, strict=True):
        r = float(x @ params[:-1] + params[-1]) - t
        out[:-2] += np.r_[r * x, r]
        out[-2] += r * r
    out[-1] = len(X)


@pytest.mark.parametrize("batch", [None, "minibatch"])
def test_block_ordered_sums_are_bitwise_the_same_for_any_split(batch):
    rng = np.random.default_rng(5)
    n, d, B = 203, 4, 9
    X = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-4, 4, size=(n, 1))
    y = rng.normal(size=n)
    rows = np.flatnonzero(rng.uniform(size=n) > 0.2)  # training rows after a validation split
    params = rng.normal(size=d + 1)
    chosen = rng.permutation(rows.size)[:57] if batch else None  # positions in global order
    results = []
    for size in (1, 2, 3, 5):
        items, reducers = [], []
        for r in range(size):
            a, b = aligned_row_block(n, r, size, B)
            mine = np.flatnonzero((rows >= a) & (rows < b))  # this rank's training rows
            red = BlockOrderedReduction(sequential_kernel, None, rows[mine], B)
            local = None
            if chosen is not None:  # the batch's rows on this rank, in the batch's order
                pos = {g: i for i, g in enumerate(mine)}
                local = red.arrange(np.array([pos[g] for g in chosen if g in pos], dtype=int))
            sel = np.arange(mine.size) if local is None else local
            red.local_sums(params, X[rows[mine]][sel], y[rows[mine]][sel], np.zeros(d + 3), local)
            items.append((red._ids, red._parts, np.array([0.0, 7.0])))
            reducers.append(red)
        buf = np.zeros(d + 5)
        reducers[0].comm = GatherOf(items)
        reducers[0].reduce_(buf)
        assert buf[-1] == 7.0 * size and buf[-3] == (57 if batch else rows.size)
        results.append(buf)
    for other in results[1:]:
        assert other[:-2].tobytes() == results[0][:-2].tobytes()  # flag and step: per rank


def test_per_block_zscore_statistics_do_not_depend_on_the_split():
    rng = np.random.default_rng(8)
    X = rng.normal(100.0, 3.0, size=(500, 3)).astype(np.float32)
    blocks = np.arange(500) // 16
    whole = merge_moments(block_moments(X, blocks))
    for cut in (16, 160, 320):  # ranks own whole blocks: cuts on block boundaries
        parts = block_moments(X[:cut], blocks[:cut]) + block_moments(X[cut:], blocks[cut:])
        split = merge_moments(parts)
        assert split[0] == whole[0]
        assert split[1].tobytes() == whole[1].tobytes() and split[2].tobytes() == whole[2].tobytes()
    z = fit_scaler("zscore", X, SerialComm(), blocks)
    assert np.allclose(z.shift, X.astype(np.float64).mean(axis=0), rtol=1e-12)


def test_config_combinations_without_meaning_are_errors():
    check_comm_config(load_config(None, ["comm.reproducible=true"]))
    bad = [
        (["comm.reproducible=true", "comm.strategy=overlap"], "comm.reproducible"),
        (["comm.reproducible=true", "comm.compression=fp16"], "comm.reproducible"),
        (["optim.name=lbfgs", "comm.strategy=local_sgd"], "comm.strategy"),
        (["optim.name=lbfgs", "comm.compression=bf16"], "comm.compression"),
    ]
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key):
            check_comm_config(load_config(None, overrides))


def test_step_check_and_outcomes():
    check_step(6.0, 2, 3)
    with pytest.raises(RuntimeError, match="out of step"):
        check_step(7.0, 2, 3)
    total = StepOutcome(1.0, 2.0, False) + StepOutcome(0.5, 1.0, True)
    assert (total.loss_sum, total.rows, total.stop) == (1.5, 3.0, True)
    assert set(STRATEGIES) == {"sync", "local_sgd", "overlap"}


def test_missing_horovod_is_an_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)  # makes `import horovod.torch` fail
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(LeptonError, match="make install-horovod"):
        make_backend("horovod", SerialComm())


# ---- each strategy on simulated ranks, with the real kernels, against NumPy -----------------
def comm_cfg(strategy="sync", **kw):
    return SimpleNamespace(
        **{"strategy": strategy, "local_steps": 1, "compression": "none", "reproducible": False}
        | kw
    )


def sgd(lr=0.05):
    return make_optimizer(OptimConfig(name="sgd", lr=lr), LINEAR.n_params)


P0 = np.array([0.3, -0.1, 0.2, 0.0, 0.5])


def on_ranks(size, n, steps, cfg, l2=0.0, stop_at=None):
    """Run ``steps`` steps of ``cfg``'s strategy on ``size`` ranks (each rank's block of the
    rows is its whole batch), settle, and return every rank's (params, outcomes, optimiser)."""
    X, y = data(n)
    parts = np.array_split(np.arange(n), size)

    def rank(comm):
        ctx = with_reduction(context(comm, l2=l2))
        opt, params = sgd(), P0.copy()
        strategy = make_strategy(cfg, ctx, opt, params)
        mine = parts[comm.rank]
        outs = []
        for t in range(steps):
            if (t, comm.rank) == stop_at:  # a signal: the flag stays set
                ctx.stop.signum = 15
            outs.append(strategy.step(params, X[mine], y[mine], t, mine))
        outs.append(strategy.settle(params, steps))
        return params, outs, opt

    return run_ranks(size, rank), (X, y, parts)


@pytest.mark.parametrize("size", [2, 3])
def test_sync_is_full_batch_gradient_descent(size):
    (results, (X, y, _)) = on_ranks(size, 61, 5, comm_cfg("sync"), l2=0.02)
    ref = P0.copy()
    for _ in range(5):
        ref = ref - 0.05 * reference_gradient(X, y, ref, 0.02)
    for params, outs, opt in results:
        assert params.tobytes() == results[0][0].tobytes()
        assert np.allclose(params, ref, rtol=1e-12, atol=1e-13)
        assert [o.rows for o in outs] == [61.0] * 5 + [0.0]  # settle reduces nothing
        assert opt.t == 5


def test_overlap_applies_each_gradient_one_step_late():
    (results, (X, y, _)) = on_ranks(2, 50, 4, comm_cfg("overlap"), l2=0.02)
    ref, pending = P0.copy(), None
    for _ in range(4):
        sums, _ = reference_sums(X, y, ref)
        if pending is not None:  # the gradient of the previous step, L2 at the current params
            ref = ref - 0.05 * (pending / 50 + 0.02 * np.r_[ref[:-1], 0.0])
        pending = sums
    ref = ref - 0.05 * (pending / 50 + 0.02 * np.r_[ref[:-1], 0.0])  # settle drains it
    for params, outs, opt in results:
        assert params.tobytes() == results[0][0].tobytes()
        assert np.allclose(params, ref, rtol=1e-12, atol=1e-13)
        assert [o.rows for o in outs] == [0.0, 50.0, 50.0, 50.0, 50.0]
        assert opt.t == 4


def test_local_sgd_averages_parameters_weighted_by_rows():
    K, steps, n = 2, 4, 51
    (results, (X, y, parts)) = on_ranks(2, n, steps, comm_cfg("local_sgd", local_steps=K))
    ref = P0.copy()
    for _ in range(steps // K):
        moved = []
        for mine in parts:
            p = ref.copy()
            for _ in range(K):
                p = p - 0.05 * reference_gradient(X[mine], y[mine], p)
            moved.append((p - ref) * (K * len(mine)))
        ref = ref + sum(moved) / (K * n)
    for params, outs, opt in results:
        assert params.tobytes() == results[0][0].tobytes()
        assert np.allclose(params, ref, rtol=1e-12, atol=1e-13)
        assert [o.rows for o in outs] == [0.0, K * n, 0.0, K * n, 0.0]  # a reduction per K
        assert opt.t == steps  # the optimiser's counter is averaged too


def test_local_sgd_sees_a_stop_at_the_next_average():
    (results, _) = on_ranks(2, 40, 4, comm_cfg("local_sgd", local_steps=2), stop_at=(2, 1))
    for _, outs, _ in results:
        assert [o.stop for o in outs] == [False, False, False, True, False]


def test_a_stop_on_one_rank_reaches_every_rank_in_the_same_step():
    (results, _) = on_ranks(3, 40, 3, comm_cfg("sync"), stop_at=(1, 2))
    for _, outs, _ in results:
        assert [o.stop for o in outs] == [False, True, True, False]


def test_reproducible_sync_is_bitwise_the_same_on_any_number_of_ranks():
    n = 203
    X, y = data(n, seed=9)
    X *= 10.0 ** np.random.default_rng(2).uniform(-3, 3, size=(n, 1))  # sums sensitive to order
    B = global_block_rows(n)
    batches = [np.sort(np.random.default_rng(t).permutation(n)[:90]) for t in range(3)]

    def run(size):
        def rank(comm):
            a, b = aligned_row_block(n, comm.rank, size, B)
            ctx = with_reduction(context(comm), np.arange(a, b), n, reproducible=True)
            opt, params = sgd(1e-4), P0.copy()
            strategy = make_strategy(comm_cfg("sync", reproducible=True), ctx, opt, params)
            for t, batch in enumerate(batches):
                local = ctx.reduction.arrange(batch[(batch >= a) & (batch < b)] - a)
                strategy.step(params, X[a:b][local], y[a:b][local], t, local)
            return params

        return run_ranks(size, rank)

    one = run(1)[0]
    ref = P0.copy()
    for batch in batches:
        ref = ref - 1e-4 * reference_gradient(X[batch], y[batch], ref)
    assert np.allclose(one, ref, rtol=1e-10, atol=1e-12)
    for size in (2, 3):
        for params in run(size):
            assert params.tobytes() == one.tobytes()

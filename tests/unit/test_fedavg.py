"""Federated averaging without MPI: the seeded client draw, the row-weighted average of the
sampled clients (simulated ranks, real kernels, against a float64 NumPy reference), a client not
sampled weighing exactly nothing, the FedProx gradient against finite differences, the config
errors, and ``lepton split --by-label`` (a partition; skew grows as alpha shrinks; atomic,
never overwriting)."""

import argparse
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from lepton_hpc.config import OptimConfig, load_config
from lepton_hpc.errors import ConfigError, DataError, LeptonError
from lepton_hpc.optim import make_optimizer
from lepton_hpc.split_cmd import dirichlet_split, split_file
from lepton_hpc.training.strategies import (
    check_comm_config,
    client_files,
    make_strategy,
    sample_clients,
)
from tests.unit.training_fakes import LINEAR, context, data, reference_gradient, run_ranks
from tests.unit.training_fakes import with_reduction as reduction

P0 = np.array([0.3, -0.1, 0.2, 0.0, 0.5])
LR = 0.05


# ---- the client draw ---------------------------------------------------------------------
def test_client_draw_is_a_function_of_seed_and_round():
    for clients, fraction, m in [(4, 0.5, 2), (10, 0.3, 3), (7, 1.0, 7), (5, 0.01, 1)]:
        draws = [sample_clients(9, r, clients, fraction) for r in range(50)]
        again = [sample_clients(9, r, clients, fraction) for r in range(50)]
        assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
        for d in draws:
            assert d.size == m and np.all(np.diff(d) > 0) and d.min() >= 0 and d.max() < clients
        if m < clients:  # rounds draw different sets, and every client gets its turns
            assert len({d.tobytes() for d in draws}) > 1
            counts = np.bincount(np.concatenate(draws), minlength=clients)
            assert counts.min() > 0 and abs(counts.mean() - 50 * m / clients) < 1e-9
    assert not np.array_equal(
        np.stack([sample_clients(1, r, 10, 0.3) for r in range(5)]),
        np.stack([sample_clients(2, r, 10, 0.3) for r in range(5)]),
    )


# ---- one round on simulated ranks against NumPy --------------------------------------------
def fed_cfg(fraction=1.0, local_epochs=2, mu=0.0):
    return SimpleNamespace(
        strategy="fedavg",
        local_epochs=local_epochs,
        client_fraction=fraction,
        prox_mu=mu,
        compression="none",
        reproducible=False,
    )


def clients_data(sizes, poison=None):
    """Each client's rows (different counts); ``poison``: a client whose rows are replaced by
    huge (finite) values that would wreck any model they touched."""
    out = []
    for k, n in enumerate(sizes):
        X, y = data(n, seed=10 + k)
        if k == poison:
            X, y = np.full_like(X, 1e150), np.full_like(y, -1e150)
        out.append((X, y))
    return out


def one_round(sizes, cfg, seed, poison=None):
    parts = clients_data(sizes, poison)

    def rank(comm):
        ctx = reduction(context(comm))
        opt = make_optimizer(OptimConfig(name="sgd", lr=LR), LINEAR.n_params)
        params = P0.copy()
        X, y = parts[comm.rank]
        fed = make_strategy(cfg, ctx, opt, params, seed=seed, rows=len(y), epochs=cfg.local_epochs)
        outs = []
        for epoch in range(cfg.local_epochs):  # full batch: one step per local epoch
            fed.begin_epoch(params, epoch, 0)
            fed.step(params, X, y, epoch, np.arange(len(y)))
            outs.append(fed.settle(params, epoch + 1))
        return params, outs, fed

    return run_ranks(len(sizes), rank), parts


def reference_round(parts, sampled, local_epochs, mu=0.0):
    """float64 NumPy: each sampled client's local gradient descent from P0, then the average
    weighted by its rows."""
    total, weight = np.zeros_like(P0), 0.0
    for k in sampled:
        X, y = parts[k]
        p = P0.copy()
        for _ in range(local_epochs):
            p = p - LR * (reference_gradient(X, y, p) + mu * (p - P0))
        total += len(y) * p
        weight += len(y)
    return total / weight


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_a_round_is_the_row_weighted_mean_of_the_sampled_clients(mu):
    sizes, seed = [30, 45, 61], 4
    results, parts = one_round(sizes, fed_cfg(fraction=2 / 3, mu=mu), seed)
    sampled = sample_clients(seed, 0, 3, 2 / 3)
    assert sampled.size == 2
    ref = reference_round(parts, sampled, 2, mu)
    for params, outs, fed in results:
        assert params.tobytes() == results[0][0].tobytes()  # every rank holds the average
        assert np.allclose(params, ref, rtol=1e-12, atol=1e-13)
        assert fed.sampled.tolist() == sampled.tolist()
        rows = sum(sizes[k] for k in sampled) * 2  # rows seen by the sampled clients
        assert [o.rows for o in outs] == [0.0, rows]  # one reduction, at the round's end
        assert fed.global_step == 2 * sampled.size  # client steps of the sampled clients


def test_a_client_not_sampled_weighs_exactly_nothing():
    sizes, seed, fraction = [30, 45, 61, 20], 0, 0.5
    sampled = sample_clients(seed, 0, 4, fraction)
    left_out = int(np.setdiff1d(np.arange(4), sampled)[0])
    clean, parts = one_round(sizes, fed_cfg(fraction), seed)
    poisoned, _ = one_round(sizes, fed_cfg(fraction), seed, poison=left_out)
    for (a, _, _), (b, _, _) in zip(clean, poisoned, strict=True):
        assert a.tobytes() == b.tobytes()  # bitwise: its data never entered the sum
    assert np.allclose(clean[0][0], reference_round(parts, sampled, 2), rtol=1e-12)
    # the construction can fail: poison a sampled client and the model is wrecked
    wrecked, _ = one_round(sizes, fed_cfg(fraction), seed, poison=int(sampled[0]))
    assert not np.allclose(wrecked[0][0], clean[0][0], rtol=1e-3)


def test_fedprox_gradient_matches_finite_differences():
    X, y = data(40, seed=5)
    mu = 0.7
    ((w1, w2, anchor),) = run_ranks(1, lambda comm: two_prox_steps(comm, X, y, mu))
    g = (w1 - w2) / LR  # the gradient the strategy applied at w1

    def objective(w):  # mean squared loss plus the FedProx term
        r = X @ w[:-1] + w[-1] - y
        return float(r @ r) / len(y) + 0.5 * mu * float((w - anchor) @ (w - anchor))

    h = 1e-6
    fd = np.array([(objective(w1 + h * e) - objective(w1 - h * e)) / (2 * h) for e in np.eye(5)])
    assert not np.allclose(w1, anchor)  # the prox term is not zero where it is checked
    assert np.allclose(g, fd, rtol=1e-6, atol=1e-7)
    assert not np.allclose(g, reference_gradient(X, y, w1), rtol=1e-3)  # mu mattered


def two_prox_steps(comm, X, y, mu):
    ctx = reduction(context(comm))
    opt = make_optimizer(OptimConfig(name="sgd", lr=LR), LINEAR.n_params)
    params = P0.copy()
    fed = make_strategy(fed_cfg(mu=mu, local_epochs=1), ctx, opt, params, rows=len(y), epochs=1)
    fed.begin_epoch(params, 0, 0)
    rows = np.arange(len(y))
    fed.step(params, X, y, 0, rows)
    w1 = params.copy()
    fed.step(params, X, y, 1, rows)
    return w1, params.copy(), fed.anchor.copy()


def test_optimizer_state_is_reset_every_round():
    cfg = fed_cfg(local_epochs=1)

    def rank(comm):
        ctx = reduction(context(comm))
        opt = make_optimizer(OptimConfig(name="adam", lr=0.01), LINEAR.n_params)
        params = P0.copy()
        X, y = data(30, seed=comm.rank)
        fed = make_strategy(cfg, ctx, opt, params, rows=30, epochs=3)
        for epoch in range(3):
            fed.begin_epoch(params, epoch, 0)
            fed.step(params, X, y, epoch, np.arange(30))
            assert opt.state()["t"] == 1  # a fresh Adam each round
            fed.settle(params, epoch + 1)
        return opt.state()

    for state in run_ranks(2, rank):
        assert state["t"] == 0 and not np.any(state["m"])


def test_a_signal_on_one_rank_stops_every_rank_after_the_round():
    cfg = fed_cfg(local_epochs=2)

    def rank(comm):
        ctx = reduction(context(comm))
        opt = make_optimizer(OptimConfig(name="sgd", lr=LR), LINEAR.n_params)
        params = P0.copy()
        X, y = data(20, seed=comm.rank)
        fed = make_strategy(cfg, ctx, opt, params, rows=20, epochs=4)
        outs = []
        for epoch in range(4):
            fed.begin_epoch(params, epoch, 0)
            if (epoch, comm.rank) == (2, 1):  # a signal on rank 1 in round 2's first epoch
                ctx.stop.signum = 15
            fed.step(params, X, y, epoch, np.arange(20))
            outs.append(fed.settle(params, epoch).stop)
        return outs

    for outs in run_ranks(3, rank):
        assert outs == [False, False, False, True]  # seen at the round's one reduction


# ---- config errors ---------------------------------------------------------------------------
def test_impossible_combinations_are_errors_naming_the_key():
    check_comm_config(load_config(None, ["comm.strategy=fedavg", "data.train=c-{rank}.h5"]))
    bad = [
        (["comm.strategy=fedavg", "optim.name=lbfgs"], "comm.strategy"),
        (["comm.strategy=fedavg", "comm.reproducible=true"], "comm.reproducible"),
        (["comm.strategy=fedavg", "comm.compression=fp16"], "comm.compression"),
        (["comm.strategy=fedavg", "train.max_steps=10"], "train.max_steps"),
        (["comm.strategy=fedavg", "checkpoint.every_steps=10"], "checkpoint.every_steps"),
    ]
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key):
            check_comm_config(load_config(None, overrides))
    for overrides, key in [
        (["comm.client_fraction=0"], "comm.client_fraction"),
        (["comm.client_fraction=1.5"], "comm.client_fraction"),
        (["comm.local_epochs=0"], "comm.local_epochs"),
        (["comm.prox_mu=-1"], "comm.prox_mu"),
        (["data.train=clients/c-{rank}.h5"], "data.train"),  # {rank} under sync
        (["data.train=clients/c-{rank}.h5", "comm.strategy=local_sgd"], "data.train"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, overrides)


def test_client_files_one_per_rank():
    assert client_files("c/client-{rank}.h5", 3) == [f"c/client-{r}.h5" for r in range(3)]
    assert client_files(["a.h5", "b.h5"], 2) == ["a.h5", "b.h5"]
    assert client_files("only.h5", 1) == ["only.h5"]
    with pytest.raises(ConfigError, match=r"data\.train.*3 files for 2 ranks"):
        client_files(["a.h5", "b.h5", "c.h5"], 2)
    with pytest.raises(ConfigError, match=r"data\.train.*\{rank\}"):
        client_files("pooled.h5", 4)


# ---- lepton split --by-label -------------------------------------------------------------------
def skew(parts, y):
    """Mean total-variation distance between each client's label mix and the whole data's."""
    classes = np.unique(y)
    whole = np.array([np.mean(y == c) for c in classes])
    return np.mean(
        [0.5 * np.abs([np.mean(y[p] == c) for c in classes] - whole).sum() for p in parts]
    )


def test_dirichlet_split_is_a_partition_and_skew_grows_as_alpha_shrinks():
    y = np.random.default_rng(0).integers(0, 10, size=3000)
    by_alpha = {}
    for alpha in (0.05, 0.3, 1.0, 100.0):
        values = []
        for seed in range(5):
            parts = dirichlet_split(y, 6, alpha, seed)
            rows = np.concatenate(parts)
            assert np.array_equal(np.sort(rows), np.arange(y.size))  # every row exactly once
            assert all(np.all(np.diff(p) > 0) for p in parts)  # file order kept
            values.append(skew([p for p in parts if p.size], y))
        by_alpha[alpha] = np.mean(values)
    assert by_alpha[0.05] > by_alpha[0.3] > by_alpha[1.0] > by_alpha[100.0]
    assert by_alpha[100.0] < 0.05 < 0.5 < by_alpha[0.05]
    again = dirichlet_split(y, 6, 0.3, 1)
    assert all(
        np.array_equal(a, b) for a, b in zip(again, dirichlet_split(y, 6, 0.3, 1), strict=True)
    )


def split_args(src, out, **kw):
    base = {
        "input": str(src),
        "out": str(out),
        "clients": 3,
        "alpha": 0.5,
        "seed": 1,
        "x": "X",
        "y": "y",
    }
    return argparse.Namespace(**(base | {"by_label": True, "force": False} | kw))


def test_split_writes_client_files_atomically_and_never_overwrites(tmp_path: Path):
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(300, 4)), rng.integers(0, 5, size=300)
    src = tmp_path / "all.h5"
    with h5py.File(src, "w") as fh:
        fh["X"], fh["y"] = X, y
    out = tmp_path / "clients"
    assert "wrote 3 client files" in split_file(split_args(src, out))
    got_X, got_y = [], []
    for k in range(3):
        with h5py.File(out / f"client-{k}.h5", "r") as fh:
            got_X.append(fh["X"][()])
            got_y.append(fh["y"][()])
    order = np.concatenate(dirichlet_split(y, 3, 0.5, 1))
    assert np.array_equal(np.concatenate(got_X), X[order])  # every row once, values kept
    assert np.array_equal(np.concatenate(got_y), y[order])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.h5", "clients"]  # no temporaries
    before = (out / "client-0.h5").read_bytes()
    with pytest.raises(LeptonError, match="exists; pass --force"):
        split_file(split_args(src, out, seed=2))
    assert (out / "client-0.h5").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    split_file(split_args(src, out, seed=2, force=True))
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces client files only
    assert (out / "client-0.h5").read_bytes() != before
    with pytest.raises(LeptonError, match="refusing to overwrite an input"):
        split_file(split_args(out / "client-1.h5", out, force=True))
    with pytest.raises(DataError, match="would get no rows"):
        split_file(split_args(src, tmp_path / "many", clients=400, alpha=0.01))
    assert not (tmp_path / "many").exists()
    with pytest.raises(LeptonError, match="--alpha"):
        split_file(split_args(src, tmp_path / "bad", alpha=0.0))

"""Federated averaging on real ``mpiexec -n 4`` jobs (one client per rank) on scikit-learn's
digits, split over the clients with ``lepton split --by-label --alpha 0.3``: it reaches the
accuracy of centralised training on the pooled rows (same model, same epochs) on a held-out test
file; a client that is never sampled cannot change the model, however bad its data, and a run
stopped between rounds and resumed ends bitwise where the uninterrupted run does (one check of
both: the poisoned, interrupted run against the clean, uninterrupted one)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from lepton_hpc.training.strategies import sample_clients
from tests.conftest import lepton, mpi_env, ok, read_params, write_config

RANKS = 4
EPOCHS = 60


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Digits scaled to [0, 1]: 1437 training rows split over 4 clients, 360 test rows."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("fed")
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    for name, rows in (("test.h5", order[:360]), ("train.h5", order[360:])):
        with h5py.File(root / name, "w") as fh:
            fh["X"], fh["y"] = X[np.sort(rows)] / 16.0, y[np.sort(rows)].astype(np.int64)
    ok(
        lepton(
            1, "split", "--by-label", "--clients", RANKS, "--alpha", 0.3, "--seed", 1,
            root / "train.h5", "--out", root / "clients",
        )
    )  # fmt: skip
    return root


def config(root: Path, name: str, strategy: str = "fedavg", **extra) -> Path:
    fed = strategy == "fedavg"
    sections = {
        "data": {
            "train": str(root / ("clients/client-{rank}.h5" if fed else "train.h5")),
            "test": str(root / "test.h5"),
        },
        "model": {"kind": "softmax"},
        "optim": {"name": "sgd", "lr": 0.1},
        "train": {"epochs": EPOCHS, "batch_size": 32, "seed": 3},
        "comm": {"strategy": strategy}
        | ({"local_epochs": 1, "client_fraction": 0.5} if fed else {}),
        "checkpoint": {"keep": 3},
        "output": {"dir": str(root / name), "plot": False},
    }
    for key, body in extra.items():
        sections.setdefault(key, {}).update(body)
    return write_config(root / f"{name}.toml", sections)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_split_gives_every_row_to_one_client_with_label_skew(digits):
    with h5py.File(digits / "train.h5") as fh:
        X, y = fh["X"][()], fh["y"][()]
    parts = []
    for k in range(RANKS):
        with h5py.File(digits / "clients" / f"client-{k}.h5") as fh:
            parts.append((fh["X"][()], fh["y"][()]))
    assert sum(len(p[1]) for p in parts) == len(y)
    pooled = np.concatenate([p[0] for p in parts])
    assert np.array_equal(np.unique(pooled, axis=0), np.unique(X, axis=0))
    mixes = np.array([np.bincount(p[1], minlength=10) / len(p[1]) for p in parts])
    assert np.abs(mixes - np.bincount(y, minlength=10) / len(y)).sum(axis=1).max() > 0.5  # skew


def test_fedavg_reaches_centralised_accuracy(digits):
    zscore = {"data": {"scale": "zscore"}}  # fitted on every client's rows, as on the pooled
    ok(lepton(RANKS, "train", config(digits, "fed", **zscore), timeout=240))
    ok(lepton(RANKS, "train", config(digits, "central", strategy="sync", **zscore), timeout=240))
    fedavg_run = digits / "fed"
    with h5py.File(digits / "train.h5") as fh:
        X = fh["X"][()]
    with h5py.File(fedavg_run / "model.h5") as fh:
        shift, scale = fh["scaler/shift"][()], fh["scaler/scale"][()]
    std = X.std(axis=0)
    assert np.allclose(shift, X.mean(axis=0), rtol=1e-12, atol=1e-14)
    assert np.allclose(scale, np.where(std > 0, std, 1.0), rtol=1e-12, atol=1e-14)
    central = json.loads((digits / "central" / "results.json").read_text())
    fed = json.loads((fedavg_run / "results.json").read_text())
    acc_c, acc_f = central["metrics"]["test"]["accuracy"], fed["metrics"]["test"]["accuracy"]
    print(f"test accuracy: centralised {acc_c:.4f}, fedavg {acc_f:.4f} ({EPOCHS} rounds)")
    assert acc_c > 0.93
    assert acc_f >= acc_c - 0.03
    assert fed["rows"]["train"] == central["rows"]["train"] == 1437  # every client's rows counted
    rounds = history(fedavg_run)
    assert [r["round"] for r in rounds] == list(range(1, EPOCHS + 1))
    for r in rounds:  # the draw of each round, as every rank computed it
        assert r["sampled"] == sample_clients(3, r["round"] - 1, RANKS, 0.5).tolist()
        assert np.isfinite(r["client_loss"]) and "train" in r


def poison(digits: Path, client: int) -> Path:
    """The client files with ``client``'s rows replaced by huge (finite) values and one label:
    a model trained on them even once is wrecked."""
    poisoned = digits / "poisoned"
    poisoned.mkdir()
    for k in range(RANKS):
        with h5py.File(digits / "clients" / f"client-{k}.h5") as src:
            X, y = src["X"][()], src["y"][()]
        if k == client:
            X, y = np.full_like(X, 1e6), np.zeros_like(y)
        with h5py.File(poisoned / f"client-{k}.h5", "w") as fh:
            fh["X"], fh["y"] = X, y
    return poisoned


def test_never_sampled_client_changes_nothing_and_resume_is_bitwise(digits):
    """Clean files, uninterrupted, against a poisoned client 2 that the seed never samples, in a
    run that crashes between rounds 3 and 4 and resumes: bitwise the same model."""
    rounds, fraction, bad = 8, 0.25, 2
    seed = next(  # a seed whose draws leave client 2 out of every round
        s
        for s in range(1000)
        if all(bad not in sample_clients(s, r, RANKS, fraction) for r in range(rounds))
    )

    def cfg(name: str, files: Path) -> Path:
        return config(
            digits,
            name,
            train={"epochs": rounds, "seed": seed},
            comm={"client_fraction": fraction},
            data={"train": str(files / "client-{rank}.h5"), "test": ""},
        )

    ok(lepton(RANKS, "train", cfg("clean", digits / "clients"), timeout=240))
    clean = history(digits / "clean")
    assert all(bad not in r["sampled"] for r in clean) and len(clean) == rounds
    step = clean[2]["step"]  # rank 0's first local step of round 4
    dirty = cfg("dirty", poison(digits, bad))
    crash = lepton(RANKS, "train", dirty, env=mpi_env(LEPTON_FAULT=f"raise=0@{step}"), timeout=240)
    assert crash.returncode != 0 and "injected fault" in crash.stderr
    assert len(history(digits / "dirty")) == 3  # rounds 1-3 done and checkpointed
    res = ok(lepton(RANKS, "train", dirty, "--resume", "auto", timeout=240))
    assert f"(epoch 3, step {step})" in res.stdout + res.stderr
    assert [r["sampled"] for r in history(digits / "dirty")] == [r["sampled"] for r in clean]
    params = read_params(digits / "clean" / "model.h5")
    assert np.isfinite(params).all()
    assert read_params(digits / "dirty" / "model.h5").tobytes() == params.tobytes()

"""Runs that produce nothing meaningful never exit 0, and a job that cannot write its status
still ends: zero rows, a diverging loss, absurd labels, a watchdog or a finish that meets a
refusing file system.
"""

import json
import math
import os
import signal
import time

import h5py
import numpy as np
import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import finish, lepton, mpi_env, ok, rank_pids, start_mpi, write_config, write_h5
from tests.safety.conftest import assert_unchanged, check_failure, snapshot

RANKS = 2


def data_file(tmp_path, n=60, d=3, seed=0, name="train.h5", labels=None):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X[:, 0] > 0).astype(float) if labels is None else labels(X)
    return write_h5(tmp_path / name, X, y)


def config(tmp_path, data_path, /, name="run", **sections):
    base = {
        "data": {"train": str(data_path)},
        "model": {"kind": "logistic"},
        "optim": {"name": "sgd", "lr": 0.1},
        "train": {"epochs": 2, "batch_size": 16},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / f"{name}.toml", base)


def strict_json(path):
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON literal {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_every_row_dropped_is_an_error_not_a_run(tmp_path):
    X = np.full((40, 3), np.nan)
    data = write_h5(tmp_path / "nan.h5", X, np.zeros(40))
    cfg = config(tmp_path, data, data={"nonfinite": "drop"})
    before = snapshot(data, cfg)
    res = lepton(RANKS, "train", cfg, timeout=120)
    check_failure(res, 2, f"'{data}:X'", "no training rows", "40 dropped")
    assert "dropped 40 of 40 rows" in res.stderr
    assert_unchanged(before, data, cfg)
    assert not (tmp_path / "run").exists()


def test_dropped_rows_are_always_reported(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    X[[3, 30], 1] = np.inf
    data = write_h5(tmp_path / "some.h5", X, (X[:, 0] > 0).astype(float))
    res = ok(lepton(RANKS, "train", config(tmp_path, data, data={"nonfinite": "drop"})))
    assert "dropped 2 of 50 rows" in res.stderr and str(data) in res.stderr
    assert strict_json(tmp_path / "run" / "results.json")["rows"]["train"] == 48


def test_infinite_learning_rate_is_a_config_error(tmp_path):
    cfg = config(tmp_path, data_file(tmp_path))
    check_failure(lepton(RANKS, "train", cfg, "optim.lr=inf"), 2, "'optim.lr'", "finite")
    assert not (tmp_path / "run").exists()


def test_diverging_loss_fails_and_keeps_the_last_good_checkpoint(tmp_path):
    # Targets of 1e150 with a large step: the squared loss overflows to inf within a few steps.
    data = data_file(tmp_path, n=80, labels=lambda X: X[:, 0] * 1e150)
    cfg = config(
        tmp_path,
        data,
        model={"kind": "linear"},
        optim={"lr": 10.0},
        train={"epochs": 50, "batch_size": 8},
        checkpoint={"every_steps": 1, "keep": 2},
    )
    res = lepton(RANKS, "train", cfg, timeout=120)
    check_failure(res, 1, "diverged", "last good checkpoint")
    run = tmp_path / "run"
    status = strict_json(run / "status.json")
    assert status["status"] == "failed" and "diverged" in status["error"]
    assert not (run / "results.json").exists() and not (run / "model.h5").exists()
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.h5"))
    assert ckpts, "the good checkpoints before the divergence are kept"
    for path in ckpts:
        st = read_checkpoint(path)
        assert np.isfinite(st.params).all() and all(math.isfinite(h["loss"]) for h in st.history)


def test_label_far_beyond_the_classes_is_an_error(tmp_path):
    labels = lambda X: (X[:, 0] > 0).astype(float)  # noqa: E731
    data = data_file(tmp_path, labels=labels)
    with h5py.File(data, "r+") as fh:
        fh["y"][7] = 100000.0
    cfg = config(tmp_path, data, model={"kind": "softmax"})
    before = snapshot(data, cfg)
    res = lepton(RANKS, "train", cfg, timeout=120)
    check_failure(res, 2, f"'{data}:y'", "label 100000", "model.max_classes = 1000")
    assert_unchanged(before, data, cfg)
    assert not (tmp_path / "run").exists()


def test_results_are_strict_json_and_huge_seeds_run(tmp_path):
    cfg = config(tmp_path, data_file(tmp_path), train={"seed": 2**63 - 1})
    ok(lepton(RANKS, "train", cfg, "--overwrite", "train.epochs=1"))  # override after option
    res = strict_json(tmp_path / "run" / "results.json")
    assert res["status"] == "completed" and res["epochs"] == 1
    assert res["config"]["train"]["seed"] == 2**63 - 1


def slow_job(cfg, delay="0.05"):
    env = mpi_env(LEPTON_FAULT=f"delay={delay}")
    return start_mpi(RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=env)


def wait_status(run, proc, state="running", timeout=90):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if json.loads((run / "status.json").read_text())["status"] == state:
                return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"job ended early: {proc.communicate()}")
        time.sleep(0.1)
    pytest.fail(f"status never became {state}")


def test_watchdog_ends_the_job_even_when_the_status_cannot_be_written(tmp_path):
    """A frozen rank and a run directory that refuses status.json: the job still ends (76)."""
    data = data_file(tmp_path, n=400)
    cfg = config(tmp_path, data, train={"epochs": 100}, checkpoint={"watchdog_s": 2.0})
    run = tmp_path / "run"
    proc = slow_job(cfg, delay="0.02")
    wait_status(run, proc)
    (run / "status.json").unlink()
    (run / "status.json").mkdir()  # every later status write fails (a file cannot replace it)
    os.kill(rank_pids(proc.pid)[1], signal.SIGSTOP)
    t0 = time.monotonic()
    res = finish(proc, timeout=60)
    assert time.monotonic() - t0 < 2.0 + 15.0
    assert res.returncode == 76, res.stderr
    assert "watchdog" in res.stderr and "could not write" in res.stderr


def test_failure_while_finishing_is_recorded(tmp_path):
    """The test set vanishes during training: the end fails (exit 2) and status says failed."""
    data = data_file(tmp_path, n=200)
    test = data_file(tmp_path, n=50, seed=3, name="test.h5")
    cfg = config(tmp_path, data, data={"test": str(test)}, train={"epochs": 3})
    run = tmp_path / "run"
    proc = slow_job(cfg, delay="0.1")
    wait_status(run, proc)
    test.unlink()
    res = finish(proc, timeout=120)
    check_failure(res, 2, str(test))
    status = strict_json(run / "status.json")
    assert status["status"] == "failed" and str(test) in status["error"]
    assert not (run / "results.json").exists()

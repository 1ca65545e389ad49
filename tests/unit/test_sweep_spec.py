"""Sweep files into tasks: grid and random points, folds, checks of every key (no MPI)."""

import pytest

from lepton_hpc.errors import ConfigError
from lepton_hpc.sweep.spec import load_sweep, parse_sweep, sweep_tasks
from lepton_hpc.sweep.toml_writer import dumps

BASE = {
    "data": {"train": "d.h5", "validation_fraction": 0.2},
    "model": {"kind": "mlp", "hidden": [8]},
    "optim": {"name": "adam", "lr": 0.01},
    "output": {"plot": False},
}


def spec_of(sweep, base=BASE):
    return parse_sweep({"base": base, "sweep": {"out": "runs/s", **sweep}})


def test_grid_is_every_combination_last_key_fastest():
    spec = spec_of({"grid": {"optim.lr": [0.1, 0.01], "model.hidden": [[16], [32, 16]]}})
    assert spec.points == [
        {"optim.lr": 0.1, "model.hidden": [16]},
        {"optim.lr": 0.1, "model.hidden": [32, 16]},
        {"optim.lr": 0.01, "model.hidden": [16]},
        {"optim.lr": 0.01, "model.hidden": [32, 16]},
    ]
    tasks = sweep_tasks(spec)
    assert [t.id for t in tasks] == ["task-0000", "task-0001", "task-0002", "task-0003"]
    assert "model.hidden=[32, 16]" in tasks[1].payload["overrides"]
    assert tasks[1].payload["overrides"][-1] == "output.dir=runs/s/task-0001"


def test_random_search_is_seeded_and_in_range():
    sweep = {
        "random": {
            "optim.lr": {"log_uniform": [1e-4, 1e-1]},
            "model.l2": {"uniform": [0, 0.5]},
            "train.epochs": {"int_uniform": [1, 3]},
            "model.activation": {"choice": ["relu", "tanh"]},
        },
        "samples": 20,
        "seed": 7,
    }
    a, b = spec_of(sweep), spec_of(sweep)
    assert a.points == b.points and len(a.points) == 20
    assert a.points != spec_of({**sweep, "seed": 8}).points
    for p in a.points:
        assert 1e-4 <= p["optim.lr"] <= 1e-1 and 0 <= p["model.l2"] <= 0.5
        assert p["train.epochs"] in (1, 2, 3) and p["model.activation"] in ("relu", "tanh")
    assert a.log_keys == {"optim.lr"}


def test_folds_make_k_tasks_per_point_with_the_fold_keys():
    spec = spec_of({"grid": {"optim.lr": [0.1, 0.01]}, "folds": 3})
    tasks = sweep_tasks(spec)
    assert len(tasks) == 6
    assert [(t.payload["point"], t.payload["fold"]) for t in tasks[:4]] == [
        (0, 0), (0, 1), (0, 2), (1, 0)
    ]  # fmt: skip
    over = tasks[4].payload["overrides"]
    assert "data.folds=3" in over and "data.fold=1" in over
    assert "data.validation_fraction=0.0" in over


@pytest.mark.parametrize(
    ("sweep", "key"),
    [
        ({}, "sweep"),
        ({"grid": {"optim.lr": [0.1]}, "random": {"optim.lr": {"uniform": [0, 1]}}}, "sweep"),
        ({"grid": {"optim.lr": []}}, "sweep.grid.optim.lr"),
        ({"grid": {"optim.lr": [0.1]}, "bogus": 1}, "sweep.bogus"),
        ({"grid": {"optim.lr": [0.1]}, "metric": "val.speed"}, "sweep.metric"),
        ({"grid": {"optim.lr": [0.1]}, "metric": "test.accuracy"}, "sweep.metric"),
        ({"grid": {"optim.lr": [0.1]}, "mode": "best"}, "sweep.mode"),
        ({"grid": {"optim.lr": [0.1]}, "folds": 1}, "sweep.folds"),
        ({"grid": {"optim.lr": [-1.0]}}, "optim.lr"),
        ({"grid": {"optim.nope": [1]}}, "optim.nope"),
        ({"grid": {"output.dir": ["x"]}}, "sweep: 'output.dir'"),
        ({"random": {"optim.lr": {"uniform": [0, 1]}}}, "sweep.samples"),
        ({"random": {"optim.lr": {"normal": [0, 1]}}, "samples": 2}, "sweep.random.optim.lr"),
        ({"random": {"optim.lr": {"log_uniform": [0, 1]}}, "samples": 2}, "sweep.random.optim.lr"),
    ],
)
def test_bad_sweeps_name_the_key(sweep, key):
    with pytest.raises(ConfigError) as err:
        spec_of(sweep)
    assert err.value.key == key


def test_base_from_a_file_and_command_line_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(dumps(BASE))
    (tmp_path / "sweep.toml").write_text(
        'base = "base.toml"\n[sweep]\ngrid = {"optim.lr" = [0.5]}\n'
    )
    spec = load_sweep("sweep.toml", ["train.epochs=2"])
    assert spec.base["train"]["epochs"] == 2 and spec.base["model"]["hidden"] == [8]


def test_k_folds_partition_the_rows_and_config_checks_them():
    import numpy as np

    from lepton_hpc.config import config_from_dict
    from lepton_hpc.data.dataset import validation_mask

    rows = np.arange(1000)
    masks = [validation_mask(rows, 0.0, seed=3, folds=4, fold=f) for f in range(4)]
    assert np.array_equal(np.sum(masks, axis=0), np.ones(1000))  # each row in exactly one fold
    assert all(200 < m.sum() < 300 for m in masks)
    assert np.array_equal(masks[1][100:300], validation_mask(rows[100:300], 0.0, 3, 4, 1))
    for bad, key in (({"folds": 1}, "data.folds"), ({"folds": 3, "fold": 3}, "data.fold"),
                     ({"folds": 3, "validation_fraction": 0.2}, "data.folds")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            config_from_dict({"data": bad})
        assert err.value.key == key


def test_the_example_sweep_in_jobs_parses(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    spec = load_sweep("jobs/sweep_demo.toml")
    assert len(sweep_tasks(spec)) == 6 and spec.metric == "val.accuracy"
    assert spec.base["model"]["kind"] == "mlp"

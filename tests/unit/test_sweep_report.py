"""A sweep's results: aggregation over points and folds, sweep.csv, best.toml (no training)."""

import csv
import io
import tomllib

import pytest

from lepton_hpc.config import config_from_dict
from lepton_hpc.scheduler import TaskResult
from lepton_hpc.sweep.command import _metric_missing
from lepton_hpc.sweep.report import aggregate, best_toml, to_csv, write_report
from lepton_hpc.sweep.spec import sweep_tasks
from tests.unit.test_sweep_spec import BASE, spec_of


def fake_results(tasks, scores, fail=()):
    out = []
    for t, s in zip(tasks, scores, strict=True):
        if t.id in fail:
            out.append(TaskResult(t.id, "failed", error="boom", attempts=2))
            continue
        metrics = {"train": {"accuracy": s + 0.1, "rows": 10, "confusion": [[1]]},
                   "val": {"accuracy": s, "log_loss": 1 - s}}  # fmt: skip
        out.append(TaskResult(t.id, "ok", value={"metrics": metrics}, attempts=1))
    return out


def test_aggregate_sorts_by_the_metric_and_puts_failures_last():
    spec = spec_of({"grid": {"optim.lr": [0.1, 0.2, 0.3, 0.4]}})
    tasks = sweep_tasks(spec)
    rows = aggregate(spec, tasks, fake_results(tasks, [0.5, 0.9, 0.7, 0.8], fail={"task-0003"}))
    assert [r["point"] for r in rows] == [1, 2, 0, 3]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and rows[-1]["status"] == "failed"
    spec_min = spec_of({"grid": {"optim.lr": [0.1, 0.2, 0.3]}, "mode": "min"})
    rows = aggregate(spec_min, tasks[:3], fake_results(tasks[:3], [0.5, 0.9, 0.5]))
    assert [r["point"] for r in rows] == [0, 2, 1]  # ties keep point order


def test_folds_are_averaged_with_their_spread():
    spec = spec_of({"grid": {"optim.lr": [0.1, 0.2]}, "folds": 2})
    tasks = sweep_tasks(spec)
    rows = aggregate(spec, tasks, fake_results(tasks, [0.6, 0.8, 0.9, 0.9]))
    assert rows[0]["point"] == 1 and rows[0]["score"] == 0.9 and rows[0]["score_std"] == 0.0
    assert rows[1]["score"] == pytest.approx(0.7) and rows[1]["score_std"] == pytest.approx(0.1)
    assert "confusion" not in rows[1]["metrics"]["train"]


def test_csv_and_best_toml():
    spec = spec_of({"grid": {"optim.lr": [0.1, 0.2], "model.hidden": [[4], [8, 4]]}})
    tasks = sweep_tasks(spec)
    rows = aggregate(spec, tasks, fake_results(tasks, [0.5, 0.6, 0.9, 0.7]))
    table = list(csv.reader(io.StringIO(to_csv(spec, rows))))
    assert table[0][:6] == ["rank", "point", "optim.lr", "model.hidden", "val.accuracy", "status"]
    assert table[1][:6] == ["1", "2", "0.2", "[4]", "0.9", "ok"]
    assert "train.accuracy" in table[0] and "train.rows" not in table[0]
    best = tomllib.loads(best_toml(spec, rows[0], "s.toml"))
    assert best["optim"]["lr"] == 0.2 and best["model"]["hidden"] == [4]
    assert best["output"]["dir"] == "runs/s/best" and best["data"] == BASE["data"]
    config_from_dict(best)


def test_a_metric_the_runs_do_not_report_gives_no_best_and_a_clear_message(tmp_path):
    spec = spec_of({"grid": {"optim.lr": [0.1, 0.2]}, "metric": "val.r2"})
    spec.out = tmp_path / "out"
    tasks = sweep_tasks(spec)
    results = fake_results(tasks, [0.5, 0.6])
    paths = write_report(spec, tasks, results, "s.toml")
    assert "best" not in paths and (tmp_path / "out" / "sweep.csv").exists()
    message = _metric_missing("val.r2", results)
    assert "val.r2" in message and "val.accuracy" in message
    assert _metric_missing("val.accuracy", results) == ""

"""The task farm under real mpiexec: retries, dynamic assignment, resume after a kill, batch
prediction, worker groups. Every launch has a timeout (tests/conftest.py run_mpi / finish).

Plain-Python tasks (tests/mpi/scripts/task_farm.py) test the scheduler itself; tiny L-BFGS
training runs test ``lepton sweep`` end to end.
"""

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import (
    SCRIPTS,
    kill_job,
    lepton,
    mpi_env,
    ok,
    run_mpi,
    start_mpi,
    write_h5,
)

FARM = str(SCRIPTS / "task_farm.py")


def farm(n, tmp_path, tasks, *, env=None, timeout=120, name="spec", **settings):
    """Run task_farm.py on n ranks; the rank-0 JSON report."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"tasks": tasks, **settings}))
    res = ok(run_mpi(n, [FARM, str(spec)], timeout=timeout, env=env))
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the scheduler with plain tasks -------------------------------------------------------
def test_tasks_that_fail_once_are_retried_on_the_other_worker(tmp_path):
    tasks = [{"id": f"t{i:02d}", "cost": 0.02, "value": i} for i in range(12)]
    markers = tmp_path / "markers"
    markers.mkdir()
    spared = {f"t{i:02d}" for i in range(0, 12, 2)}  # odd tasks fail once
    for tid in spared:
        (markers / tid).touch()
    env = mpi_env(LEPTON_FAIL_ONCE=str(markers))
    report = farm(3, tmp_path, tasks, env=env, retries=1)
    serial = farm(1, tmp_path, tasks, name="serial", retries=1)
    results = report["results"]
    assert [r["status"] for r in results] == ["ok"] * 12
    assert {r["id"] for r in results if r["retried"]} == {t["id"] for t in tasks} - spared
    for r in results:
        assert r["attempts"] == (1 if r["id"] in spared else 2)
        assert len(set(r["workers"])) == r["attempts"]  # a retry runs on the other worker
        assert set(r["workers"]) <= {1, 2}  # rank 0 only coordinates
    assert [r["value"] for r in results] == [r["value"] for r in serial["results"]]


def test_permanent_failures_user_errors_and_worker_groups(tmp_path):
    tasks = [
        {"id": "fine", "value": 3},
        {"id": "bug", "fail": "always"},
        {"id": "user", "fail": "user"},
        {"id": "fine2", "value": 4},
    ]
    report = farm(3, tmp_path, tasks, retries=2, ranks_per_task=2)
    by_id = {r["id"]: r for r in report["results"]}
    assert by_id["bug"]["status"] == "failed" and by_id["bug"]["attempts"] == 3
    assert by_id["bug"]["error"] == "RuntimeError: bug always fails"
    assert by_id["user"]["status"] == "failed" and by_id["user"]["attempts"] == 1  # not retried
    for tid, square in (("fine", 9), ("fine2", 16)):
        value = by_id[tid]["value"]
        assert value == {"square": square, "group_size": 2, "agree": True}  # two ranks per task
        assert by_id[tid]["workers"] == [1]  # the group's leader


def test_uneven_tasks_are_assigned_dynamically(tmp_path):
    """One long task and many short ones on two workers: the long task's worker does (almost)
    nothing else, so the busiest worker's total cost is far below static round-robin's."""
    costs = [3.0] + [0.05] * 12
    tasks = [{"id": f"t{i:02d}", "cost": c} for i, c in enumerate(costs)]
    results = farm(3, tmp_path, tasks, retries=0)["results"]
    per_worker = {}
    for task, r in zip(tasks, results, strict=True):
        per_worker.setdefault(r["workers"][0], []).append(task["cost"])
    long_worker = results[0]["workers"][0]
    other = 3 - long_worker
    assert len(per_worker[long_worker]) <= 2 and len(per_worker[other]) >= 11
    dynamic = max(sum(c) for c in per_worker.values())
    round_robin = max(sum(costs[0::2]), sum(costs[1::2]))
    assert dynamic <= 3.0 + 0.05 < round_robin


def test_a_rank_failing_alone_in_its_group_ends_the_job_instead_of_hanging(tmp_path):
    """Rank 1 of a two-rank group raises while rank 0 waits in a collective of the task: the
    failing rank waits group_sync_s for its peer, then aborts the job (a rerun resumes)."""
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "tasks": [{"id": "split", "fail": "one_rank"}],
                "ranks_per_task": 2,
                "group_sync_s": 2.0,
            }
        )
    )
    t0 = time.monotonic()
    res = run_mpi(3, [FARM, str(spec)], timeout=90)
    assert res.returncode != 0
    assert "did not finish it within 2 s" in res.stderr
    assert time.monotonic() - t0 < 60


# ---- lepton sweep ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A 240-row binary classification file (rank count 1: the same file for every test)."""
    path = tmp_path_factory.mktemp("sweepdata") / "train.h5"
    ok(lepton(1, "datagen", "--task", "logistic", "--rows", 240, "--features", 4,
              "--seed", 5, "--out", path))  # fmt: skip
    return path


def write_sweep(path: Path, data: Path, out: Path, grid: str, extra: str = "") -> Path:
    path.write_text(
        f"""
[base.data]
train = "{data}"
validation_fraction = 0.25
scale = "zscore"
[base.model]
kind = "logistic"
[base.optim]
name = "lbfgs"
[base.train]
epochs = 3
[base.output]
plot = false

[sweep]
grid = {grid}
metric = "val.log_loss"
mode = "min"
retries = 1
out = "{out}"
{extra}
"""
    )
    return path


GRID_12 = '{"optim.lr" = [1.0, 0.5, 0.25], "model.l2" = [0.0, 0.01], "train.seed" = [1, 2]}'


def test_sweep_with_failures_on_3_ranks_equals_a_serial_sweep(small_data, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    failing = {"task-0001", "task-0004", "task-0007", "task-0010"}
    for i in range(12):
        if f"task-{i:04d}" not in failing:
            (markers / f"task-{i:04d}").touch()
    par = write_sweep(tmp_path / "par.toml", small_data, tmp_path / "par", GRID_12)
    ser = write_sweep(tmp_path / "ser.toml", small_data, tmp_path / "ser", GRID_12)
    res = ok(lepton(3, "sweep", par, env=mpi_env(LEPTON_FAIL_ONCE=str(markers)), timeout=240))
    ok(lepton(1, "sweep", ser, timeout=240))
    assert "12/12 done" in res.stdout and "4 retried" in res.stdout
    summary = json.loads((tmp_path / "par" / "sweep.json").read_text())
    assert len(summary["tasks"]) == 12 and all(t["status"] == "ok" for t in summary["tasks"])
    assert {t["id"] for t in summary["tasks"] if t["retried"]} == failing
    assert all(t["attempts"] == 2 for t in summary["tasks"] if t["id"] in failing)
    # The aggregate is what the runs computed, and it is the same as the serial sweep's.
    assert (tmp_path / "par" / "sweep.csv").read_bytes() == (
        tmp_path / "ser" / "sweep.csv"
    ).read_bytes()
    serial = json.loads((tmp_path / "ser" / "sweep.json").read_text())
    assert summary["rows"] == serial["rows"] and summary["best"] == serial["best"]
    scores = [r["score"] for r in summary["rows"]]
    assert scores == sorted(scores)  # mode = "min": best first
    assert (tmp_path / "par" / "sweep.png").stat().st_size > 0
    # best.toml is ready to train, and trains the best point to the same metrics
    ok(lepton(1, "train", tmp_path / "par" / "best.toml", timeout=120))
    best = json.loads((tmp_path / "par" / "best" / "results.json").read_text())
    expected = summary["best"]["metrics"]["val"]
    assert {k: best["metrics"]["val"][k] for k in expected} == expected


def test_sweep_on_worker_groups_of_two_ranks(small_data, tmp_path):
    """ranks_per_task = 2: each run is a data-parallel run over its group's two ranks."""
    grid = '{"model.l2" = [0.0, 0.01]}'
    groups = write_sweep(tmp_path / "g.toml", small_data, tmp_path / "g", grid,
                         "ranks_per_task = 2")  # fmt: skip
    serial = write_sweep(tmp_path / "s.toml", small_data, tmp_path / "s", grid)
    ok(lepton(3, "sweep", groups, timeout=180))
    ok(lepton(1, "sweep", serial, timeout=180))
    for task in ("task-0000", "task-0001"):
        run = json.loads((tmp_path / "g" / task / "results.json").read_text())
        alone = json.loads((tmp_path / "s" / task / "results.json").read_text())
        assert run["ranks"] == 2 and alone["ranks"] == 1
        for part in ("train", "val"):  # the same run up to the order of floating-point sums
            for name, value in alone["metrics"][part].items():
                expected = pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
                assert run["metrics"][part][name] == expected, name


def test_sweep_killed_midway_resumes_without_repeating_finished_runs(small_data, tmp_path):
    grid = '{"optim.lr" = [1.0, 0.5, 0.25, 0.125], "model.l2" = [0.0, 0.01]}'
    sweep = write_sweep(tmp_path / "s.toml", small_data, tmp_path / "out", grid)
    journal = tmp_path / "out" / "journal.jsonl"
    slow = mpi_env(LEPTON_FAULT="delay=0.25")  # each L-BFGS step sleeps: time to kill midway
    proc = start_mpi(3, ["-m", "lepton_hpc", "sweep", str(sweep)], env=slow)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    kill_job(proc)
    done_before = {json.loads(line)["id"] for line in journal.read_text().splitlines()}
    assert 2 <= len(done_before) < 8
    res = ok(lepton(3, "sweep", sweep, timeout=240))
    assert f"{len(done_before)} already done (journal)" in res.stdout
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert all(t["status"] == "ok" for t in summary["tasks"]) and len(summary["tasks"]) == 8
    for task in summary["tasks"]:
        runs = (tmp_path / "out" / "logs" / f"{task['id']}.log").read_text().count("attempt at")
        if task["id"] in done_before:
            assert task["from_journal"] and runs == 1  # finished before the kill: never rerun
        else:
            assert not task["from_journal"] and runs >= 1


# ---- batch prediction -----------------------------------------------------------------------
def test_batch_prediction_equals_predict_on_each_file(small_data, tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'[data]\ntrain = "{small_data}"\nscale = "zscore"\n[model]\nkind = "logistic"\n'
        f'[optim]\nname = "lbfgs"\n[train]\nepochs = 3\n[output]\ndir = "{tmp_path / "run"}"\n'
        "plot = false\n"
    )
    ok(lepton(1, "train", cfg, timeout=120))
    model = tmp_path / "run" / "model.h5"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i, rows in enumerate((7, 50, 101, 1)):
        write_h5(inputs / f"part{i}.h5", rng.normal(size=(rows, 4)))
    outdir = tmp_path / "preds"
    res = ok(lepton(3, "predict", "--model", model, "--data", f"{inputs}/*.h5",
                    "--out", f"{outdir}/", timeout=120))  # fmt: skip
    assert "wrote 4 prediction file(s)" in res.stdout
    for i in range(4):
        alone = tmp_path / f"alone{i}.h5"
        ok(lepton(1, "predict", "--model", model, "--data", inputs / f"part{i}.h5",
                  "--out", alone, timeout=120))  # fmt: skip
        with h5py.File(outdir / f"part{i}.h5") as batch, h5py.File(alone) as single:
            assert sorted(batch) == sorted(single) == ["labels", "probabilities"]
            for name in single:
                a, b = batch[name][()], single[name][()]
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    again = lepton(3, "predict", "--model", model, "--data", f"{inputs}/*.h5",
                   "--out", f"{outdir}/", timeout=120)  # fmt: skip
    assert again.returncode != 0 and "pass --force" in again.stderr  # outputs are never clobbered

"""A careless output.dir never destroys a user's files: ``--overwrite`` clears only a lepton run
directory (marked with ``.lepton-run``), only the toolkit's files in it, never a directory that
holds an input; and two jobs never share a run directory (the second fails naming the first)."""

import json
import socket
import time

import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import (
    datagen,
    finish,
    lepton,
    mpi_env,
    ok,
    rank_pids,
    start_mpi,
    write_config,
)
from tests.safety.conftest import assert_unchanged, check_failure, leftover_temporaries, snapshot

RANKS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("rundir") / "train.h5", 400, 4, seed=3)


def sections(train_file, out, **extra):
    base = {
        "data": {"train": str(train_file)},
        "model": {"kind": "logistic"},
        "optim": {"name": "sgd", "lr": 0.1},
        "train": {"epochs": 2, "batch_size": 64},
        "output": {"dir": str(out), "plot": False},
    }
    for key, body in extra.items():
        base.setdefault(key, {}).update(body)
    return base


@pytest.fixture
def project(tmp_path):
    """A user's project folder: data, config, notes and files that look like a run's outputs."""
    proj = tmp_path / "proj"
    proj.mkdir()
    datagen(proj / "data.h5", 200, 4, seed=1)
    (proj / "notes.txt").write_text("three weeks of notes")
    (proj / "model.h5").write_bytes(b"my hand-made model")
    (proj / "results.json").write_text('{"paper": "figure 3"}')
    (proj / "checkpoints").mkdir()
    (proj / "checkpoints" / "ckpt-0000000001.h5").write_bytes(b"not yours")
    return proj


def test_overwrite_of_a_project_folder_is_refused(project):
    cfg = write_config(project / "config.toml", sections(project / "data.h5", project))
    before = snapshot(project)
    res = lepton(RANKS, "train", cfg, "--overwrite", timeout=120)
    check_failure(res, 2, f"'{project}' is not a lepton run directory", ".lepton-run")
    assert "choose another output.dir" in res.stderr
    assert_unchanged(before, project)
    assert sorted(p.name for p in project.iterdir()) == sorted(
        ["data.h5", "notes.txt", "model.h5", "results.json", "checkpoints", "config.toml"]
    )


def test_overwrite_of_dot_run_from_the_project_folder_is_refused(project):
    cfg = write_config(project / "config.toml", sections("data.h5", "."))
    before = snapshot(project)
    res = lepton(RANKS, "train", "config.toml", "--overwrite", cwd=project, timeout=120)
    check_failure(res, 2, "'.' is not a lepton run directory (no .lepton-run marker)")
    assert_unchanged(before, project)
    assert cfg.exists() and not (project / ".lepton-run").exists()


def test_without_overwrite_a_project_folder_is_refused_without_recommending_it(project):
    cfg = write_config(project / "config.toml", sections(project / "data.h5", project))
    before = snapshot(project)
    res = lepton(RANKS, "train", cfg, timeout=120)
    check_failure(res, 2, f"'{project}'", "choose a new output.dir", "--resume auto")
    assert "--overwrite" not in res.stderr
    assert_unchanged(before, project)


def test_overwrite_of_the_data_files_directory_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    train = datagen(store / "train.h5", 200, 4, seed=2)
    test = datagen(store / "test.h5", 100, 4, seed=2)
    cfg = write_config(tmp_path / "c.toml", sections(train, store, data={"test": str(test)}))
    before = snapshot(store, cfg)
    res = lepton(RANKS, "train", cfg, "--overwrite", timeout=120)
    check_failure(res, 2, f"'{store}' is not a lepton run directory")
    assert_unchanged(before, store, cfg)


def test_overwrite_of_a_marked_run_holding_the_data_is_refused(tmp_path, data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", sections(data, run))
    ok(lepton(RANKS, "train", cfg, timeout=120))
    assert (run / ".lepton-run").is_file()
    # the user then keeps a data file (and the config) inside that run directory
    inner = datagen(run / "more.h5", 200, 4, seed=9)
    cfg2 = write_config(run / "again.toml", sections(inner, run))
    before = snapshot(run)
    res = lepton(RANKS, "train", cfg2, "--overwrite", timeout=120)
    check_failure(res, 2, f"'{run}' holds the input", "refusing to clear it")
    assert_unchanged(before, run)


def test_overwrite_of_a_marked_run_keeps_the_users_files(tmp_path, data):
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml", sections(data, run, checkpoint={"every_steps": 2, "keep": 2})
    )
    ok(lepton(RANKS, "train", cfg, timeout=120))
    (run / "notes.txt").write_text("what I tried")
    (run / "checkpoints" / "README").write_text("mine")
    old = {p.name for p in (run / "checkpoints").glob("ckpt-*.h5")}
    assert old
    res = lepton(RANKS, "train", cfg, "train.epochs=1", "--overwrite", timeout=120)
    ok(res)
    assert (run / "notes.txt").read_text() == "what I tried"
    assert (run / "checkpoints" / "README").read_text() == "mine"
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert json.loads((run / "results.json").read_text())["epochs"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not leftover_temporaries(run)


def test_refusal_message_of_a_marked_run_names_overwrite(tmp_path, data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", sections(data, run))
    ok(lepton(RANKS, "train", cfg, timeout=120))
    before = snapshot(run)
    res = lepton(RANKS, "train", cfg, timeout=120)
    check_failure(res, 2, f"'{run}'", "--resume auto", "--overwrite")
    assert_unchanged(before, run)


def wait_running(status, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status.exists():
            try:
                if json.loads(status.read_text())["status"] == "running":
                    return
            except ValueError:
                pass
        if proc.poll() is not None:
            pytest.fail(f"first job ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("the first job never reported running")


def test_a_second_job_cannot_use_a_run_directory_in_use(tmp_path):
    train = datagen(tmp_path / "train.h5", 2000, 4, seed=4)
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml",
        sections(
            train,
            run,
            train={"epochs": 8, "batch_size": 100},
            checkpoint={"every_steps": 5, "keep": 3},
        ),
    )
    first = start_mpi(
        RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=mpi_env(LEPTON_FAULT="delay=0.05")
    )
    try:
        wait_running(run / "status.json", first)
        holder = rank_pids(first.pid)[0]
        second = lepton(RANKS, "train", cfg, "--overwrite", timeout=120)
        resumed = lepton(RANKS, "train", cfg, "--resume", "auto", timeout=120)
    finally:
        done = finish(first, timeout=240)
    who = f"run directory '{run}' is in use by pid {holder} on host {socket.gethostname()} since"
    check_failure(second, 2, who)
    check_failure(resumed, 2, who)
    ok(done)
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.h5"))
    assert len(ckpts) == 3
    for path in ckpts:
        read_checkpoint(path)  # intact: nothing of them was deleted or rewritten
    assert (run / "model.h5").is_file() and not leftover_temporaries(run)


def test_sweep_keeps_an_unmarked_task_directory(tmp_path, data):
    out = tmp_path / "sweep"
    squatter = out / "task-0000"
    squatter.mkdir(parents=True)
    (squatter / "results.json").write_text('{"mine": true}')
    (squatter / "thesis.tex").write_text("\\chapter{One}")
    spec = tmp_path / "s.toml"
    spec.write_text(
        f"""
[base.data]
train = "{data}"
validation_fraction = 0.25
[base.model]
kind = "logistic"
[base.optim]
name = "sgd"
lr = 0.1
[base.train]
epochs = 1
batch_size = 64
[base.output]
plot = false

[sweep]
grid = {{"optim.lr" = [0.1, 0.2]}}
metric = "val.log_loss"
mode = "min"
retries = 0
out = "{out}"
"""
    )
    before = snapshot(squatter)
    res = lepton(RANKS, "sweep", spec, timeout=240)
    assert res.returncode == 1, res.stdout + res.stderr
    assert_unchanged(before, squatter)
    assert sorted(p.name for p in squatter.iterdir()) == ["results.json", "thesis.tex"]
    log = (out / "logs" / "task-0000.log").read_text() + res.stdout + res.stderr
    assert "not a lepton run directory" in log
    task1 = out / "task-0001"
    assert (task1 / ".lepton-run").is_file()
    assert json.loads((task1 / "status.json").read_text())["status"] == "completed"

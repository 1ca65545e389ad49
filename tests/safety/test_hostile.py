"""More of what a user does at 2 a.m.: an altered model, labels as a column, paths that are the
wrong kind of thing, links into the inputs. Each case: the exit code, one line naming the
culprit, no traceback, and every input byte for byte unchanged."""

import json
import os

import h5py
import numpy as np
import pytest

from tests.conftest import lepton, ok, write_config, write_h5
from tests.safety.conftest import assert_unchanged, check_failure, leftover_temporaries, snapshot

RANKS = 2


def rows(n=120, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, (X[:, 0] + 0.3 * X[:, -1] > 0).astype(float)


def config(tmp_path, data, run="run", **sections):
    base = {
        "data": {"train": str(data)},
        "model": {"kind": "logistic"},
        "optim": {"name": "lbfgs"},
        "train": {"epochs": 5},
        "output": {"dir": str(tmp_path / run), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / f"{run}.toml", base)


@pytest.fixture
def trained(tmp_path):
    X, y = rows()
    data = write_h5(tmp_path / "data.h5", X, y)
    ok(lepton(RANKS, "train", config(tmp_path, data)))
    return data, tmp_path / "run" / "model.h5"


def test_altered_model_is_refused_by_evaluate_and_predict(tmp_path, trained):
    data, model = trained
    with h5py.File(model, "r+") as fh:  # a "tweaked" weight, checksum left as it was
        fh["params"][0] += 1.0
    before = snapshot(data, model)
    res = lepton(RANKS, "evaluate", "--model", model, "--data", data)
    check_failure(res, 2, f"model file '{model}' fails its checksum")
    out = tmp_path / "pred.h5"
    res = lepton(RANKS, "predict", "--model", model, "--data", data, "--out", out)
    check_failure(res, 2, "fails its checksum")
    assert not out.exists() and not leftover_temporaries(tmp_path)
    assert_unchanged(before, data, model)


@pytest.mark.parametrize("kind", ["logistic", "linear"])
def test_labels_as_a_column_train_evaluate_and_predict(tmp_path, kind):
    X, y = rows()
    column = write_h5(tmp_path / "col.h5", X, y[:, None])
    plain = write_h5(tmp_path / "plain.h5", X, y)
    metrics = {}
    for name, data in (("col", column), ("plain", plain)):
        cfg = config(tmp_path, data, run=name, model={"kind": kind})
        ok(lepton(RANKS, "train", cfg))
        metrics[name] = json.loads((tmp_path / name / "results.json").read_text())["metrics"]
        js = tmp_path / f"{name}.json"
        model = tmp_path / name / "model.h5"
        ok(lepton(RANKS, "evaluate", "--model", model, "--data", data, "--json", js))
        ok(
            lepton(
                RANKS,
                "predict",
                "--model",
                model,
                "--data",
                data,
                "--out",
                tmp_path / name / "p.h5",
            )
        )
    assert metrics["col"] == metrics["plain"]  # (n, 1) labels are the same single target


def test_one_dimensional_features_are_one_feature(tmp_path):
    X, y = rows(d=1)
    data = write_h5(tmp_path / "one.h5", X[:, 0], y)
    ok(lepton(RANKS, "train", config(tmp_path, data)))
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["model"]["sizes"] == [1, 1] and res["metrics"]["train"]["accuracy"] > 0.6


@pytest.mark.parametrize("what", ["data-dir", "config-dir", "out-is-dir"])
def test_paths_of_the_wrong_kind(tmp_path, what):
    X, y = rows()
    data = write_h5(tmp_path / "data.h5", X, y)
    before = snapshot(data)
    if what == "data-dir":
        (tmp_path / "d.h5").mkdir()
        res = lepton(RANKS, "train", config(tmp_path, tmp_path / "d.h5"))
        check_failure(res, 2, "d.h5")
    elif what == "config-dir":
        (tmp_path / "c.toml").mkdir()
        res = lepton(RANKS, "train", tmp_path / "c.toml")
        check_failure(res, 2, "c.toml")
    else:
        ok(lepton(RANKS, "train", config(tmp_path, data)))
        (tmp_path / "out.h5").mkdir()
        model = tmp_path / "run" / "model.h5"
        res = lepton(
            RANKS,
            "predict",
            "--model",
            model,
            "--data",
            data,
            "--out",
            tmp_path / "out.h5",
            "--force",
        )
        check_failure(res, 2, f"output '{tmp_path / 'out.h5'}' is a directory")
    assert_unchanged(before, data)


def test_overwrite_through_a_symlink_to_the_data_directory(tmp_path):
    """output.dir is a link to the folder holding the data and the config: never cleared."""
    X, y = rows()
    project = tmp_path / "project"
    project.mkdir()
    data = write_h5(project / "data.h5", X, y)
    (project / "notes.txt").write_text("mine")
    link = tmp_path / "runlink"
    os.symlink(project, link)
    cfg = config(project, data, output={"dir": str(link)})
    before = snapshot(project)
    res = lepton(RANKS, "train", cfg, "--overwrite")
    check_failure(res, 2, "refusing to clear it")
    assert_unchanged(before, project)


def test_training_data_named_like_a_run_file_is_never_replaced(tmp_path):
    """Data kept as <run dir>/model.h5: training into that directory would write over it."""
    X, y = rows()
    run = tmp_path / "run"
    run.mkdir()
    data = write_h5(run / "model.h5", X, y)
    cfg = config(tmp_path, data)
    before = snapshot(run)
    res = lepton(RANKS, "train", cfg, "--resume", "auto")
    check_failure(res, 2, "model.h5", "refusing to overwrite an input")
    assert_unchanged(before, run)


def test_datagen_does_not_replace_a_file_without_force(tmp_path):
    mine = tmp_path / "mine.h5"
    mine.write_bytes(b"precious")
    res = lepton(RANKS, "datagen", "--task", "linear", "--rows", 10, "--features", 2, "--out", mine)
    check_failure(res, 2, f"'{mine}' exists", "--force")
    assert mine.read_bytes() == b"precious"

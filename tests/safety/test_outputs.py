"""Output files never replace an input: predict, evaluate and convert refuse an output that is
their data or model file (through a symlink or a hard link too), even with ``--force``; an
existing output is replaced only with ``--force``, atomically, leaving no temporary."""

import json
import os

import h5py
import numpy as np
import pytest

from tests.conftest import datagen, lepton, ok, write_config, write_h5
from tests.safety.conftest import assert_unchanged, check_failure, leftover_temporaries, snapshot

RANKS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data file, model file) of a small logistic run, shared by the module's cases."""
    root = tmp_path_factory.mktemp("outputs")
    data = datagen(root / "data.h5", 300, 4, seed=7)
    cfg = write_config(
        root / "c.toml",
        {
            "data": {"train": str(data)},
            "model": {"kind": "logistic"},
            "optim": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 1, "batch_size": 64},
            "output": {"dir": str(root / "run"), "plot": False},
        },
    )
    ok(lepton(RANKS, "train", cfg, timeout=120))
    return data, root / "run" / "model.h5"


@pytest.fixture
def inputs(trained, tmp_path):
    """Private copies of the data and model files (a case may not harm the shared ones)."""
    data, model = tmp_path / "data.h5", tmp_path / "model.h5"
    data.write_bytes(trained[0].read_bytes())
    model.write_bytes(trained[1].read_bytes())
    return data, model


def predict(model, data, out, *extra):
    return lepton(RANKS, "predict", "--model", model, "--data", data, "--out", out, *extra,
                  timeout=120)  # fmt: skip


def test_predict_out_is_data_with_force_is_refused(inputs):
    data, model = inputs
    before = snapshot(data, model)
    res = predict(model, data, data, "--force")
    check_failure(res, 2, f"--out '{data}' is the input data file '{data}'",
                  "refusing to overwrite an input")  # fmt: skip
    assert_unchanged(before, data, model)
    assert not leftover_temporaries(data.parent)


def test_predict_out_is_model_with_force_is_refused(inputs):
    data, model = inputs
    before = snapshot(data, model)
    res = predict(model, data, model, "--force")
    check_failure(res, 2, f"--out '{model}' is the input model file '{model}'")
    assert_unchanged(before, data, model)


def test_predict_out_a_symlink_to_the_data_is_refused(inputs):
    data, model = inputs
    link = data.parent / "preds.h5"
    link.symlink_to(data)
    before = snapshot(data, model, link)
    res = predict(model, data, link, "--force")
    check_failure(res, 2, f"--out '{link}' is the input data file '{data}'")
    assert_unchanged(before, data, model, link)


def test_predict_out_a_hard_link_to_the_model_is_refused(inputs):
    data, model = inputs
    hard = data.parent / "preds.h5"
    os.link(model, hard)
    before = snapshot(data, model)
    res = predict(model, data, hard, "--force")
    check_failure(res, 2, f"--out '{hard}' is the input model file '{model}'")
    assert_unchanged(before, data, model)


def test_predict_replaces_an_old_output_only_with_force(inputs):
    data, model = inputs
    out = data.parent / "preds.h5"
    out.write_bytes(b"yesterday's predictions")
    before = snapshot(out)
    check_failure(predict(model, data, out), 2, f"output '{out}' exists", "--force")
    assert_unchanged(before, out)
    ok(predict(model, data, out, "--force"))
    with h5py.File(out) as fh:
        assert fh["probabilities"].shape == (300, 1) and fh["labels"].shape == (300,)
    assert not leftover_temporaries(data.parent)


def test_batch_predict_into_the_inputs_directory_is_refused(inputs, tmp_path):
    _, model = inputs
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_h5(parts / f"p{i}.h5", rng.normal(size=(20, 4)))
    before = snapshot(parts, model)
    res = predict(model, f"{parts}/*.h5", f"{parts}/", "--force")
    check_failure(res, 2, f"--out '{parts / 'p0.h5'}' is the input data file", "refusing")
    assert_unchanged(before, parts, model)


def test_batch_predict_onto_the_model_is_refused(inputs, tmp_path):
    _, model = inputs
    parts = tmp_path / "parts"
    parts.mkdir()
    write_h5(parts / "model.h5", np.zeros((5, 4)))
    before = snapshot(parts, model)
    # outputs go to model.parent/<input name> = the model file itself
    res = predict(model, f"{parts}/*.h5", f"{model.parent}/", "--force")
    check_failure(res, 2, f"is the input model file '{model}'")
    assert_unchanged(before, parts, model)


def evaluate(model, data, *extra):
    return lepton(RANKS, "evaluate", "--model", model, "--data", data, *extra, timeout=120)


def test_evaluate_json_onto_the_model_is_refused_even_with_force(inputs):
    data, model = inputs
    before = snapshot(data, model)
    for extra in ((), ("--force",)):
        res = evaluate(model, data, "--json", model, *extra)
        check_failure(res, 2, f"--json '{model}' is the input model file '{model}'")
        assert_unchanged(before, data, model)
    res = evaluate(model, data, "--json", data, "--force")
    check_failure(res, 2, f"--json '{data}' is the input data file '{data}'")
    assert_unchanged(before, data, model)


def test_evaluate_json_existing_needs_force_and_is_strict_json(inputs):
    data, model = inputs
    out = data.parent / "metrics.json"
    out.write_text('{"kept": "until --force"}')
    before = snapshot(out)
    res = evaluate(model, data, "--json", out)
    check_failure(res, 2, f"output '{out}' exists", "--force")
    assert_unchanged(before, out)
    ok(evaluate(model, data, "--json", out, "--force"))

    def refuse(token):
        raise AssertionError(f"non-JSON literal {token}")

    written = json.loads(out.read_text(), parse_constant=refuse)
    assert written["model"] == str(model) and written["metrics"]["rows"] == 300
    assert not leftover_temporaries(data.parent)


def test_convert_out_is_the_input_with_force_is_refused(tmp_path):
    src = tmp_path / "table.csv"
    src.write_text("a,b,y\n1,2,0\n3,4,1\n5,6,0\n")
    before = snapshot(src)
    res = lepton(RANKS, "convert", src, "--out", src, "--force", timeout=120)
    check_failure(res, 2, f"--out '{src}' is the input data file '{src}'")
    assert_unchanged(before, src)
    link = tmp_path / "out.h5"
    link.symlink_to(src)
    res = lepton(RANKS, "convert", src, "--out", link, "--force", timeout=120)
    check_failure(res, 2, f"--out '{link}' is the input data file '{src}'")
    assert_unchanged(before, src)
    assert not leftover_temporaries(tmp_path)


def test_datagen_force_replaces_atomically(tmp_path):
    out = tmp_path / "d.h5"
    out.write_bytes(b"old")
    res = lepton(RANKS, "datagen", "--task", "linear", "--rows", 50, "--features", 3,
                 "--out", out, timeout=120)  # fmt: skip
    check_failure(res, 2, f"output '{out}' exists", "--force")
    assert out.read_bytes() == b"old"
    ok(lepton(RANKS, "datagen", "--task", "linear", "--rows", 50, "--features", 3,
              "--out", out, "--force", timeout=120))  # fmt: skip
    with h5py.File(out) as fh:
        assert fh["X"].shape == (50, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]

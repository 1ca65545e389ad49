"""Shards under real ``mpiexec``: training, evaluation and prediction over several files give the
bits of one file holding the same rows, at 1, 2 and 3 ranks; resume and output guards cover
every shard.

1,000 rows in shards of 1, 300, 7, 450 and 242 rows (the 7-row one chunked and compressed, read
through h5py; the others contiguous, read with pread): every rank's block spans files, one shard
is smaller than any rank's block and one holds a single row. Reproducible mode's global blocks
(16 rows) straddle shard boundaries.
"""

from __future__ import annotations

import itertools
import json
import shutil

import h5py
import numpy as np
import pytest

from tests.conftest import lepton, ok, read_params, write_config, write_h5

SIZES = [1, 300, 7, 450, 242]
CHUNKED = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(one file, list of shards, glob of the shards, test file, test shards)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    n = sum(SIZES)
    X = rng.normal(size=(n + 200, 6)).astype(np.float32)
    w = rng.normal(size=6)
    y = (X @ w + 0.5 * rng.normal(size=n + 200) > 0).astype(np.float64)
    one = write_h5(root / "one.h5", X[:n], y[:n])
    (root / "parts").mkdir()
    cuts = np.cumsum([0, *SIZES])
    parts = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        path = root / "parts" / f"part-{i}.h5"
        with h5py.File(path, "w") as fh:
            if i == CHUNKED:
                fh.create_dataset("X", data=X[a:b], chunks=(2, 6), compression="gzip")
            else:
                fh["X"] = X[a:b]
            fh["y"] = y[a:b]
        parts.append(path)
    test = write_h5(root / "test.h5", X[n:], y[n:])
    (root / "tests").mkdir()
    test_parts = [
        write_h5(root / "tests" / "t0.h5", X[n : n + 1], y[n : n + 1]),
        write_h5(root / "tests" / "t1.h5", X[n + 1 :], y[n + 1 :]),
    ]
    return one, parts, str(root / "parts" / "part-*.h5"), test, test_parts


def _train(tmp_path, ranks, train, name, sections, *extra):
    base = {
        "data": {"train": train, "validation_fraction": 0.2, "scale": "zscore"},
        "comm": {"reproducible": True},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    cfg = write_config(tmp_path / f"{name}.toml", base)
    ok(lepton(ranks, "train", cfg, *extra, timeout=120))
    return read_params(tmp_path / name / "model.h5")


FULL = {"model": {"kind": "logistic"}, "optim": {"name": "lbfgs"}, "train": {"epochs": 5}}
MINI = {
    "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 2, "batch_size": 64, "seed": 3},
}


@pytest.fixture(scope="module")
def mlp_one(tmp_path_factory, data):
    """The mini-batch MLP trained on the one file (1 rank, reproducible): its run directory."""
    tmp = tmp_path_factory.mktemp("mlp_one")
    _train(tmp, 1, str(data[0]), "run", MINI)
    return tmp / "run"


def test_full_batch_on_shards_is_bitwise_one_file_at_1_2_3_ranks(tmp_path, data):
    one, parts, pattern, *_ = data
    want = _train(tmp_path, 1, str(one), "one", FULL)
    for ranks, spec in ((1, [str(p) for p in parts]), (2, pattern), (3, [str(p) for p in parts])):
        got = _train(tmp_path, ranks, spec, f"shards{ranks}", FULL)
        assert np.array_equal(got, want), f"{ranks} ranks"


def test_mini_batch_mlp_on_shards_is_bitwise_one_file_and_resume_checks_shards(
    tmp_path, data, mlp_one
):
    """At 1 and 3 ranks (a list) and 2 ranks (a glob); the 2-rank run is then resumed from a moved
    copy of its shards, and refused once a shard has changed."""
    _, parts, *_ = data
    want = read_params(mlp_one / "model.h5")
    for ranks in (1, 3):
        got = _train(tmp_path, ranks, [str(p) for p in parts], f"list{ranks}", MINI)
        assert np.array_equal(got, want), f"{ranks} ranks"
    copy = shutil.copytree(parts[0].parent, tmp_path / "copy")
    assert np.array_equal(_train(tmp_path, 2, str(copy / "part-*.h5"), "glob2", MINI), want)
    cfg = tmp_path / "glob2.toml"
    moved = shutil.copytree(copy, tmp_path / "moved")
    shutil.rmtree(copy)
    again = f"data.train={moved}/part-*.h5"
    res = ok(lepton(2, "train", cfg, again, "train.epochs=3", "--resume", "auto", timeout=120))
    assert "resuming from" in res.stdout + res.stderr
    with h5py.File(moved / "part-3.h5", "r+") as fh:
        fh["X"][14, 0] += 1.0  # a sampled row (every 7th)
    res = lepton(2, "train", cfg, again, "train.epochs=4", "--resume", "auto", timeout=120)
    out = res.stderr + res.stdout
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "cannot resume: shard 3" in out and "part-3.h5" in out


def test_default_mode_on_shards_is_bitwise_one_file_at_the_same_rank_count(tmp_path, data):
    """Also ``data.test`` as shards (a list): the same test metrics as the one test file."""
    one, _, pattern, test, test_parts = data
    fast = {**MINI, "comm": {"reproducible": False}}
    want = _train(tmp_path, 2, str(one), "one", fast, f"data.test={test}")
    listed = "data.test=[" + ", ".join(json.dumps(str(p)) for p in test_parts) + "]"
    assert np.array_equal(_train(tmp_path, 2, pattern, "shards", fast, listed), want)
    metrics = [json.loads((tmp_path / n / "results.json").read_text())["metrics"] for n in
               ("one", "shards")]  # fmt: skip
    assert metrics[0]["test"] == metrics[1]["test"] and metrics[0]["test"]["rows"] == 200


def test_evaluate_and_predict_over_shards_equal_one_file(tmp_path, data, mlp_one):
    """``lepton evaluate`` / ``predict`` over test shards against the one test file through
    ``lp.load_model`` (the same numbers as the commands, bit for bit, in this process)."""
    import lepton_hpc as lp

    _, _, _, test, test_parts = data
    model_file = mlp_one / "model.h5"
    model = lp.load_model(model_file)
    pattern = str(test_parts[0].parent / "t*.h5")
    out = tmp_path / "m.json"
    ok(lepton(3, "evaluate", "--model", model_file, "--data", pattern, "--json", out, timeout=60))
    want = json.loads(json.dumps(model.evaluate(str(test))))
    assert json.loads(out.read_text())["metrics"] == want
    pred = tmp_path / "p.h5"
    ok(lepton(2, "predict", "--model", model_file, "--data", pattern, "--out", pred, timeout=60))
    with h5py.File(pred) as fh:
        assert np.array_equal(fh["probabilities"][()], model.outputs(str(test)))
        assert np.array_equal(fh["labels"][()], model.predict(str(test)))


def test_overwrite_of_a_run_directory_holding_a_shard_is_refused(tmp_path, data):
    from lepton_hpc.safety import write_marker

    _, parts, *_ = data
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run)  # an earlier run's directory, where the user has put one shard
    inside = shutil.copy(parts[3], run / "part-3.h5")
    shards = [str(p) for p in parts[:3]] + [str(inside), str(parts[4])]
    cfg = write_config(
        tmp_path / "c.toml",
        {"data": {"train": shards}, "output": {"dir": str(run), "plot": False}},
    )
    res = lepton(1, "train", cfg, "--overwrite", timeout=60)
    out = res.stderr + res.stdout
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"holds the input data.train[3] file '{inside}'" in out
    assert (run / "part-3.h5").read_bytes() == parts[3].read_bytes()  # untouched

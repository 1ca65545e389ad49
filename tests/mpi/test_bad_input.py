"""Bad input under mpiexec -n 2: one clear error line, exit code 2, no traceback, no output.

Each case checks the message names the file, data set, key or value; that the error is printed
once (not by every rank); and that nothing was written or overwritten.
"""

import h5py
import numpy as np
import pytest

from tests.conftest import lepton, ok, write_config, write_h5

RANKS = 2


def rng_data(n=50, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, (X[:, 0] > 0).astype(float)


def check_error(res, *needles):
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("lepton: error") == 1, res.stderr  # once, not from every rank
    for needle in needles:
        assert needle in res.stderr, res.stderr


def train_cfg(tmp_path, train, **sections):
    base = {
        "data": {"train": str(train)},
        "model": {"kind": "logistic"},
        "optim": {"name": "lbfgs"},
        "train": {"epochs": 3},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / "c.toml", base)


def bad_file(tmp_path, case):
    """An HDF5 file (or path) that is wrong in the way ``case`` names; and the expected words."""
    X, y = rng_data()
    p = tmp_path / f"{case}.h5"
    if case == "missing-file":
        return tmp_path / "nowhere.h5", ["nowhere.h5", "does not exist"]
    if case == "missing-dataset":
        write_h5(p, X, None, target=y)
        return p, [f"'{p}' has no data set 'y'"]
    if case == "wrong-dtype":
        with h5py.File(p, "w") as fh:
            fh["X"] = np.array([b"a", b"b"] * 25).reshape(25, 2)
            fh["y"] = np.zeros(25)
        return p, [f"'{p}:X'", "is not numeric"]
    if case == "wrong-dimensions":
        write_h5(p, X.reshape(50, 3, 1), y)
        return p, [f"'{p}:X' must be 2-D (rows x features) or 1-D (one feature)", "(50, 3, 1)"]
    if case == "one-feature-row-mismatch":
        write_h5(p, X[:40, 0], y)
        return p, [f"'{p}': 'y' has shape (50,) but 'X' has 40 rows"]
    if case == "row-mismatch":
        write_h5(p, X, y[:-3])
        return p, [f"'{p}'", "'y' has shape (47,)", "'X' has 50 rows"]
    if case == "nan":
        X[17, 1] = np.nan
        X[30, 0] = np.inf
        write_h5(p, X, y)
        return p, [f"'{p}'", "2 rows hold NaN or Inf (first: row 17)", "data.nonfinite"]
    if case == "fewer-rows-than-ranks":
        write_h5(p, X[:1], y[:1])
        return p, [f"'{p}:X' has 1 rows, fewer than the 2 ranks"]
    if case == "empty":
        write_h5(p, np.zeros((0, 3)), np.zeros(0))
        return p, [f"'{p}:X' is empty"]
    if case == "bad-labels":
        y[5] = 2.0
        write_h5(p, X, y)
        return p, [f"'{p}:y'", "label 2", "classes 0..1"]
    if case == "not-hdf5":
        p.write_text("a,b\n1,2\n")
        return p, [f"'{p}' is not a readable HDF5 file"]
    raise AssertionError(case)


DATA_CASES = [
    "missing-file",
    "missing-dataset",
    "wrong-dtype",
    "wrong-dimensions",
    "one-feature-row-mismatch",
    "row-mismatch",
    "nan",
    "fewer-rows-than-ranks",
    "empty",
    "bad-labels",
    "not-hdf5",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_training_data(tmp_path, case):
    path, needles = bad_file(tmp_path, case)
    res = lepton(RANKS, "train", train_cfg(tmp_path, path), timeout=120)
    check_error(res, *needles)
    assert not (tmp_path / "run").exists()


def test_nonfinite_rows_can_be_dropped(tmp_path):
    path, _ = bad_file(tmp_path, "nan")
    ok(lepton(RANKS, "train", train_cfg(tmp_path, path, data={"nonfinite": "drop"})))
    import json

    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"]["train"] == 48


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("optim.learning_rate=0.1", ["config key 'optim.learning_rate'", "unknown key"]),
        ("train.epochs=ten", ["config key 'train.epochs'", "expected an integer"]),
        ("optim.lr=-1", ["config key 'optim.lr'", "-1.0 must be > 0"]),
        ("train.epochs=0", ["config key 'train.epochs'", "0 must be > 0"]),
    ],
)
def test_bad_config(tmp_path, override, needles):
    X, y = rng_data()
    cfg = train_cfg(tmp_path, write_h5(tmp_path / "ok.h5", X, y))
    check_error(lepton(RANKS, "train", cfg, override, timeout=120), *needles)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tmp_path):
    X, y = rng_data()
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    cfg = train_cfg(
        tmp_path, write_h5(tmp_path / "ok.h5", X, y), output={"dir": str(blocker / "run")}
    )
    check_error(lepton(RANKS, "train", cfg, timeout=120), f"'{blocker}' is a file")


def test_existing_run_directory_is_refused_and_kept(tmp_path):
    X, y = rng_data()
    cfg = train_cfg(tmp_path, write_h5(tmp_path / "ok.h5", X, y))
    ok(lepton(RANKS, "train", cfg))
    model = tmp_path / "run" / "model.h5"
    before = model.read_bytes()
    check_error(
        lepton(RANKS, "train", cfg, "optim.lr=0.5"), "exists", "--resume auto", "--overwrite"
    )
    assert model.read_bytes() == before
    # --overwrite with bad input must not destroy the old run either
    check_error(lepton(RANKS, "train", cfg, "data.x=nope", "--overwrite"), "no data set 'nope'")
    assert model.read_bytes() == before
    ok(lepton(RANKS, "train", cfg, "--overwrite"))


def test_model_and_data_with_different_feature_counts(tmp_path):
    X, y = rng_data(d=10)
    cfg = train_cfg(tmp_path, write_h5(tmp_path / "ten.h5", X, y))
    ok(lepton(RANKS, "train", cfg))
    X12, y12 = rng_data(d=12, seed=1)
    wide = write_h5(tmp_path / "twelve.h5", X12, y12)
    model = tmp_path / "run" / "model.h5"
    needles = [f"'{wide}:X' has 12 features", "trained on 10"]
    check_error(lepton(RANKS, "evaluate", "--model", model, "--data", wide), *needles)
    out = tmp_path / "pred.h5"
    check_error(lepton(RANKS, "predict", "--model", model, "--data", wide, "--out", out), *needles)
    assert not out.exists()
    assert not list(tmp_path.glob(".pred.h5*"))


def test_existing_prediction_file_is_not_overwritten(tmp_path):
    X, y = rng_data()
    data = write_h5(tmp_path / "ok.h5", X, y)
    ok(lepton(RANKS, "train", train_cfg(tmp_path, data)))
    out = tmp_path / "pred.h5"
    out.write_bytes(b"keep me")
    res = lepton(
        RANKS, "predict", "--model", tmp_path / "run" / "model.h5", "--data", data, "--out", out
    )
    check_error(res, f"output '{out}' exists", "--force")
    assert out.read_bytes() == b"keep me"


def test_missing_model_file(tmp_path):
    X, y = rng_data()
    data = write_h5(tmp_path / "ok.h5", X, y)
    check_error(
        lepton(RANKS, "evaluate", "--model", tmp_path / "none.h5", "--data", data),
        f"model file '{tmp_path / 'none.h5'}' does not exist",
    )


def test_wrong_test_file_fails_before_training(tmp_path):
    X, y = rng_data(d=3)
    X4, y4 = rng_data(d=4, seed=2)
    train = write_h5(tmp_path / "ok.h5", X, y)
    wide = write_h5(tmp_path / "test4.h5", X4, y4)
    cfg = train_cfg(tmp_path, train, data={"test": str(wide), "scale": "zscore"})
    check_error(lepton(RANKS, "train", cfg), f"'{wide}:X' has 4 features", "trained on 3")
    assert not (tmp_path / "run").exists()
    cfg = train_cfg(tmp_path, train, data={"test": str(tmp_path / "none.h5")})
    check_error(lepton(RANKS, "train", cfg), "none.h5", "does not exist")
    assert not (tmp_path / "run").exists()

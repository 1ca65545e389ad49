"""The scikit-learn estimators and ``train`` from Python, in one process.

scikit-learn's own ``check_estimator`` runs on each estimator (epochs lowered to keep it quick);
the fitted numbers are checked against float64 NumPy references (least squares, the folded
coefficients, the reference forward pass); a file fit equals an array fit bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from lepton_hpc import kernels
from lepton_hpc.api import estimators as est
from lepton_hpc.api.run import Run, build_config, train
from lepton_hpc.errors import ConfigError, LeptonError
from tests.conftest import ROOT, read_params, write_h5
from tests.reference import forward as reference_forward

# Checks that depend on what this environment lacks, not on the estimators.
ENVIRONMENT_SKIPS = {
    "check_array_api_input",  # needs SCIPY_ARRAY_API=1 and an array API library
    "check_regressor_data_not_an_array",  # its pandas variant: pandas is not installed
    "check_classifier_data_not_an_array",
}

CHECKED = [
    est.LinearRegression(epochs=10),
    est.LogisticRegression(epochs=10),
    est.SoftmaxRegression(epochs=10),
    est.MLPClassifier(epochs=10),
    est.MLPRegressor(epochs=30),  # check_regressors_train wants R^2 > 0.5
]


@pytest.mark.parametrize("estimator", CHECKED, ids=lambda e: type(e).__name__)
def test_check_estimator(estimator) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None)
    failed = [(r["check_name"], r["exception"]) for r in results if r["status"] == "failed"]
    assert not failed
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert skipped <= ENVIRONMENT_SKIPS, skipped - ENVIRONMENT_SKIPS
    assert len(results) > 40


def blobs(n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 3.0, 1.0], [3.0, 0.0, -1.0], [-3.0, -2.0, 0.5]])
    labels = rng.integers(0, 3, n)
    X = centres[labels] + rng.normal(scale=0.8, size=(n, 3))
    return X * [1.0, 10.0, 0.1] + [5.0, 0.0, -2.0], labels


def test_string_labels_map_through_classes() -> None:
    X, ids = blobs()
    names = np.array(["zebra", "ant", "mole"])[ids]
    for model in (est.LogisticRegression(scale="zscore"), est.MLPClassifier(epochs=20)):
        model.fit(X, names)
        assert list(model.classes_) == ["ant", "mole", "zebra"]
        pred = model.predict(X)
        assert pred.dtype.kind == "U" and set(pred) <= set(names)
        assert model.score(X, names) > 0.9
        proba = model.predict_proba(X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
        assert np.array_equal(model.classes_[proba.argmax(axis=1)], pred)


def test_pipeline_cross_val_and_grid_search() -> None:
    X, y = blobs(180)
    pipe = make_pipeline(StandardScaler(), est.SoftmaxRegression(epochs=30))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.85
    grid = GridSearchCV(est.MLPClassifier(epochs=10), {"lr": [0.001, 0.05]}, cv=2)
    grid.fit(X, y)
    assert grid.best_params_ == {"lr": 0.05}
    assert grid.best_score_ > 0.85


def test_linear_regression_equals_least_squares() -> None:
    """coef_ and intercept_ (scaler folded in) against float64 least squares."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 4)) * [1.0, 20.0, 0.05, 3.0] + [0.0, 100.0, 1.0, -5.0]
    y = X @ [1.5, -0.2, 30.0, 0.7] + 4.0 + rng.normal(scale=0.1, size=300)
    A = np.column_stack([X, np.ones(len(X))])
    ref = np.linalg.lstsq(A, y, rcond=None)[0]
    model = est.LinearRegression(scale="zscore").fit(X, y)
    np.testing.assert_allclose(model.coef_, ref[:4], rtol=1e-6)
    np.testing.assert_allclose(model.intercept_, ref[4], rtol=1e-6)
    np.testing.assert_allclose(model.predict(X), A @ ref, rtol=1e-6)
    assert isinstance(model.intercept_, float) and model.n_iter_ == len(model.loss_curve_)


def test_logistic_coefficients_in_input_units() -> None:
    X, ids = blobs()
    y = (ids == 1).astype(int)
    model = est.LogisticRegression(scale="minmax", l2=1e-3).fit(X, y)
    z = X @ model.coef_.T + model.intercept_
    p = 1.0 / (1.0 + np.exp(-z[:, 0]))
    np.testing.assert_allclose(model.predict_proba(X)[:, 1], p, rtol=1e-10)
    assert model.coef_.shape == (1, 3) and model.intercept_.shape == (1,)
    multi = est.LogisticRegression(scale="zscore").fit(X, ids)
    assert multi.coef_.shape == (3, 3) and multi.spec_["head"] == "softmax"


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_mlp_outputs_equal_reference_forward(activation: str) -> None:
    X, ids = blobs(120)
    model = est.MLPClassifier(hidden=(5, 4), activation=activation, epochs=3, scale="zscore")
    model.fit(X, ids)
    _, shift, scale = model.scaler_
    sizes = model.spec_["sizes"]
    ref = reference_forward(
        (X - shift) / scale,
        model.params_,
        sizes,
        kernels.ACTIVATIONS[activation],
        kernels.HEADS[model.spec_["head"]],
    )
    ref = ref[0] if isinstance(ref, tuple) else ref
    np.testing.assert_allclose(model.predict_proba(X), ref, rtol=1e-10, atol=1e-14)


def test_file_fit_equals_array_fit_and_nothing_left_behind(tmp_path, monkeypatch) -> None:
    X, ids = blobs(150)
    path = write_h5(tmp_path / "d.h5", X, ids.astype(np.float64), feat=X, labels=ids)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    a = est.MLPClassifier(epochs=4, batch_size=32, validation_fraction=0.2).fit(X, ids)
    b = est.MLPClassifier(epochs=4, batch_size=32, validation_fraction=0.2).fit(path)
    assert np.array_equal(a.params_, b.params_)
    assert list(b.classes_) == [0, 1, 2] and b.n_features_in_ == 3
    named = est.MLPClassifier(epochs=4, batch_size=32, validation_fraction=0.2)
    assert np.array_equal(named.fit(path, "labels", x="feat").params_, a.params_)
    with pytest.raises(ValueError, match="names its targets data set"):
        named.fit(path, ids)
    assert list(work.iterdir()) == []  # nothing written to the working directory
    assert not Path(a.results_["config"]["output"]["dir"]).parent.exists()  # temp dir removed
    kept = tmp_path / "kept"
    c = est.MLPClassifier(epochs=4, batch_size=32, output_dir=str(kept)).fit(X, ids)
    assert (kept / "model.h5").is_file() and (kept / "checkpoints").is_dir()
    assert np.array_equal(read_params(kept / "model.h5"), c.params_)
    c.fit(X, ids)  # a lepton run directory there is replaced
    with pytest.raises(LeptonError, match="not a lepton run directory"):  # never cleared
        est.MLPClassifier(epochs=1, output_dir=str(work.parent)).fit(X, ids)


def test_shard_files_fit_like_one_file(tmp_path) -> None:
    """A list of shard files and a glob of them fit the model of the one file (same rows)."""
    X, ids = blobs(150)
    one = write_h5(tmp_path / "one.h5", X, ids.astype(np.float64))
    parts = [(0, 7), (7, 100), (100, 150)]
    shards = [
        write_h5(tmp_path / f"part-{i}.h5", X[a:b], ids[a:b].astype(np.float64))
        for i, (a, b) in enumerate(parts)
    ]
    kw = {"epochs": 3, "batch_size": 32, "reproducible": True}
    a = est.MLPClassifier(**kw).fit(one)
    b = est.MLPClassifier(**kw).fit(shards)
    c = est.MLPClassifier(**kw).fit(str(tmp_path / "part-*.h5"))
    assert np.array_equal(a.params_, b.params_) and np.array_equal(a.params_, c.params_)
    assert list(b.classes_) == [0, 1, 2]


def test_bad_parameter_is_a_value_error() -> None:
    X, ids = blobs(60)
    with pytest.raises(ValueError, match=r"optim\.name"):
        est.LogisticRegression(optimizer="nope").fit(X, ids)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        est.MLPRegressor(epochs=0).fit(X, ids.astype(float))
    with pytest.raises(ValueError, match="at least 2 classes"):
        est.SoftmaxRegression().fit(X, np.zeros(60))


def test_train_from_a_dict_with_overrides(tmp_path, capsys) -> None:
    X, ids = blobs(200)
    data = write_h5(tmp_path / "d.h5", X, ids.astype(np.float64))
    config = {
        "data": {"train": str(data), "scale": "zscore"},
        "model": {"kind": "softmax"},
        "train": {"epochs": 4, "batch_size": 50},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    run = train(config, optim__lr=0.05, overrides={"train.seed": 9})
    assert isinstance(run, Run) and run.dir == tmp_path / "run"
    assert run.results["config"]["optim"]["lr"] == 0.05
    assert run.results["config"]["train"]["seed"] == 9
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert run.history == [json.loads(line) for line in lines] and len(lines) == 4
    assert run.model_path == run.dir / "model.h5" and run.model_path.is_file()
    if importlib.util.find_spec("lepton_hpc.api.model") is not None:
        assert run.model is not None  # loaded in-process by the model API
    with pytest.raises(LeptonError, match="exists and is not empty"):
        train(config)
    capsys.readouterr()
    again = train(config, train__epochs=6, train__seed=9, resume="auto")
    assert "resuming from" in capsys.readouterr().out
    assert again.results["epochs"] == 6  # resumed from the 4-epoch run's checkpoint
    cfg = build_config(config, ["optim.lr=0.5", "model.l2=1e-3"], optim__lr=0.25)
    assert (cfg.optim.lr, cfg.model.l2) == (0.25, 1e-3)  # keywords last
    with pytest.raises(ConfigError, match=r"optim\.nope"):
        train(config, optim__nope=1)
    with pytest.raises(ConfigError, match="section__key"):
        train(config, lr=0.1)
    assert config["train"] == {"epochs": 4, "batch_size": 50}  # the caller's dict is untouched


def test_sklearn_stays_optional() -> None:
    code = (
        "import sys; import lepton_hpc, lepton_hpc.api.run; "
        "assert 'sklearn' not in sys.modules; "
        "sys.modules['sklearn'] = None\n"
        "try:\n    import lepton_hpc.api.estimators\n"
        "except ImportError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "pip install lepton_hpc[sklearn]" in out.stdout


def test_array_fingerprint_equals_file_fingerprint(tmp_path) -> None:
    """Rows in memory hash as the same rows in a file do (shapes, dtypes, sampled rows)."""
    from lepton_hpc.comm import SerialComm
    from lepton_hpc.data.fingerprint import fingerprint
    from lepton_hpc.data.memory import ArraySource
    from lepton_hpc.log import Log

    X, ids = blobs(500)
    y = ids.astype(np.float64)
    path = write_h5(tmp_path / "d.h5", X, y)
    source = ArraySource(X, y)
    block = source.read_block(SerialComm(), Log())
    assert block.n == 500 and block.start == 0 and np.array_equal(block.X, X)
    ours, theirs = source.fingerprint(), fingerprint(str(path), "X", "y")
    for key in ("shape_x", "dtype_x", "shape_y", "dtype_y", "sample_sha256"):
        assert ours[key] == theirs[key], key
    other = ArraySource(X[::-1], y[::-1])
    other.read_block(SerialComm(), Log())
    assert other.fingerprint()["sample_sha256"] != ours["sample_sha256"]

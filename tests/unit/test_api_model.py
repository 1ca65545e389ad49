"""``lepton_hpc.api.model``: a trained model in-process gives exactly the command line's numbers.

Every model kind (linear, logistic, softmax, MLP with each activation) is trained, predicted and
evaluated by the real CLI once (``api_zoo``); ``load_model(...)`` must then reproduce
``lepton predict``'s data sets and ``lepton evaluate``'s metrics bit for bit, from an array and
from the HDF5 path, and agree with a float64 NumPy forward pass. Errors are one LeptonError
naming what is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lepton_hpc.api.model import Model, load_model
from lepton_hpc.errors import LeptonError
from tests.conftest import ROOT
from tests.reference import forward as reference_forward
from tests.unit.api_zoo import MODELS, data_file, zoo

NAMES = list(MODELS)
HEAD_CODES = {"squared": 0, "binary": 1, "softmax": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return zoo(tmp_path_factory)


def read(path, *names):
    with h5py.File(path, "r") as fh:
        return [fh[n][()] for n in names]


def cli_metrics(root, name, tag=""):
    f = root / (f"{name}.{tag}.eval.json" if tag else f"{name}.eval.json")
    return json.loads(f.read_text())["metrics"]


def cli_outputs(root, name, tag=""):
    """What ``lepton predict`` wrote: (outputs, labels or None)."""
    f = root / (f"{name}.{tag}.pred.h5" if tag else f"{name}.pred.h5")
    with h5py.File(f, "r") as fh:
        if "probabilities" in fh:
            return fh["probabilities"][()], fh["labels"][()]
        return fh["predictions"][()], None


@pytest.mark.parametrize("name", NAMES)
def test_predict_and_evaluate_equal_the_cli_bit_for_bit(root, name):
    m = load_model(root / name / "model.h5")
    test = data_file(root, name)
    X, y = read(test, "X", "y")
    out, labels = cli_outputs(root, name)
    for source in (X, str(test), test):  # array, path string, Path
        assert np.array_equal(m.outputs(source), out)
        pred = m.predict(source)
        if m.is_classifier:
            assert pred.dtype == np.int64 and np.array_equal(pred, labels)
        else:
            want = out[:, 0] if out.shape[1] == 1 else out  # several targets: rows x targets
            assert pred.dtype == np.float64 and np.array_equal(pred, want)
    metrics = cli_metrics(root, name)
    assert m.evaluate(X, y) == metrics
    assert m.evaluate(test) == metrics
    assert m.evaluate(test, x="X", y="y") == metrics
    if y.ndim == 1:  # a column of targets is one target, as in a file
        assert m.evaluate(X, y.reshape(-1, 1)) == metrics


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_a_float64_numpy_forward_pass(root, name):
    m = load_model(root / name / "model.h5")
    (X,) = read(data_file(root, name), "X")
    s = m.scaler
    Xs = (X.astype(np.float64) - s.shift) / s.scale
    ref, _ = reference_forward(Xs, m.params, m.sizes, _act(m), HEAD_CODES[m.head])
    # the toolkit scales float32 features into float32, NumPy here in float64
    np.testing.assert_allclose(m.outputs(X), ref, rtol=1e-5, atol=1e-6)
    # and on float64 features both are float64 throughout
    np.testing.assert_allclose(m.outputs(X.astype(np.float64)), ref, rtol=1e-12, atol=1e-12)


def _act(m: Model) -> int:
    return {"sigmoid": 0, "tanh": 1, "relu": 2}.get(m.activation or "relu", 2)


@pytest.mark.parametrize(("name", "tag"), [("logistic", "f64"), ("logistic", "i16")])
def test_stored_feature_types_convert_as_the_reader_does(root, name, tag):
    """float64 stays float64, int16 is read as float32: an array of the same type agrees."""
    m = load_model(root / name / "model.h5")
    X, y = read(data_file(root, name, tag), "X", "y")
    out, labels = cli_outputs(root, name, tag)
    assert np.array_equal(m.outputs(X), out)
    assert np.array_equal(m.predict(X), labels)
    assert m.evaluate(X, y) == cli_metrics(root, name, tag)
    assert np.array_equal(m.outputs(data_file(root, name, tag)), out)
    if tag == "i16":
        assert np.array_equal(m.outputs(X.astype(np.float32)), out)
        assert np.array_equal(m.outputs(X.tolist()), out)  # Python ints: int64, as float32


def test_one_dimensional_x_is_one_feature(root):
    m = load_model(root / "linear1" / "model.h5")
    X, y = read(data_file(root, "linear1", "flat"), "X", "y")
    assert X.ndim == 1 and m.n_features_in_ == 1
    out, _ = cli_outputs(root, "linear1", "flat")
    assert np.array_equal(m.predict(X), out[:, 0])
    assert np.array_equal(m.predict(X[:, None]), out[:, 0])
    assert m.evaluate(X, y) == cli_metrics(root, "linear1", "flat")


@pytest.mark.parametrize("name", ["logistic", "softmax", "mlp_tanh", "mlp_sigmoid"])
def test_predict_proba(root, name):
    m = load_model(root / name / "model.h5")
    (X,) = read(data_file(root, name), "X")
    out, labels = cli_outputs(root, name)
    proba = m.predict_proba(X)
    assert proba.shape == (X.shape[0], m.n_classes_)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    if m.head == "binary":  # [1 - p, p]; p is lepton predict's probabilities column
        assert np.array_equal(proba[:, 1], out[:, 0]) and np.array_equal(proba[:, 0], 1 - out[:, 0])
    else:
        assert np.array_equal(proba, out)
    assert np.array_equal(np.argmax(proba, axis=1), labels)
    assert np.array_equal(m.classes_, np.arange(m.n_classes_))


def test_attributes_describe_the_model_and_are_read_only(root):
    m = load_model(root / "mlp_tanh" / "model.h5")
    with h5py.File(root / "mlp_tanh" / "model.h5", "r") as fh:
        params, shift, scale = fh["params"][()], fh["scaler/shift"][()], fh["scaler/scale"][()]
    assert (m.kind, m.task, m.activation, m.head) == ("mlp", "binary", "tanh", "binary")
    assert (m.sizes, m.hidden, m.n_features_in_, m.n_outputs_) == ((5, 6, 4, 1), (6, 4), 5, 1)
    assert m.is_classifier and m.n_classes_ == 2
    assert np.array_equal(m.params, params)
    assert m.scaler.kind == "zscore"
    assert np.array_equal(m.scaler.shift, shift) and np.array_equal(m.scaler.scale, scale)
    assert m.config["model"]["hidden"] == [6, 4]
    W0, _ = m.layers()[0]
    assert W0.shape == (5, 6) and np.array_equal(W0.ravel(), params[:30])
    (X,) = read(data_file(root, "mlp_tanh"), "X")
    before = m.outputs(X)
    with pytest.raises(ValueError, match="read-only"):
        m.params[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        m.scaler.shift[0] = 1.0
    m.config["data"]["x"] = "nope"
    m.meta.clear()
    with pytest.raises(AttributeError):
        m.kind = "linear"
    assert np.array_equal(m.outputs(X), before) and m.evaluate(data_file(root, "mlp_tanh"))
    lin = load_model(root / "linear" / "model.h5")
    assert lin.activation is None and lin.task == "regression" and not lin.is_classifier
    assert not hasattr(lin, "classes_")
    assert "linear" in repr(lin)


# ---- errors: one LeptonError naming what is wrong --------------------------------------------
def test_missing_and_damaged_model_files(root, tmp_path):
    with pytest.raises(LeptonError, match=r"model file '.*nope.h5' does not exist"):
        load_model(tmp_path / "nope.h5")
    src = (root / "logistic" / "model.h5").read_bytes()
    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(src)
    with h5py.File(flipped, "r+") as fh:  # a changed parameter: the checksum fails
        fh["params"][0] += 1.0
    with pytest.raises(LeptonError, match=r"'.*flipped.h5' fails its checksum"):
        load_model(flipped)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(src[: len(src) // 2])
    with pytest.raises(LeptonError, match=r"'.*truncated.h5' is not a readable lepton model"):
        load_model(truncated)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5\n")
    with pytest.raises(LeptonError, match=r"junk\.h5"):
        load_model(junk)


def test_a_format_1_model_loads_with_a_warning(root, tmp_path):
    old = tmp_path / "old.h5"
    old.write_bytes((root / "softmax" / "model.h5").read_bytes())
    with h5py.File(old, "r+") as fh:
        del fh.attrs["sha256"]
        fh.attrs["format_version"] = 1
    with pytest.warns(UserWarning, match=r"'.*old.h5' is unverified \(format 1: no checksum\)"):
        m = load_model(old)
    (X,) = read(data_file(root, "softmax"), "X")
    assert np.array_equal(m.predict(X), cli_outputs(root, "softmax")[1])


def test_bad_inputs_are_one_clear_error(root, tmp_path):
    m = load_model(root / "logistic" / "model.h5")
    X, y = read(data_file(root, "logistic"), "X", "y")
    with pytest.raises(LeptonError, match=r"X \(shape \(90, 4\)\) has 4 features but the model"):
        m.predict(X[:, :4])
    with pytest.raises(LeptonError, match="has 1 features but the model"):
        m.predict(X[0])  # 1-D is one feature, as in a file: a single row needs reshape(1, -1)
    wide = tmp_path / "wide.h5"
    with h5py.File(wide, "w") as fh:
        fh["X"], fh["y"] = np.zeros((3, 7)), np.zeros(3)
    with pytest.raises(LeptonError, match=r"wide.h5:X' has 7 features but the model"):
        m.predict(wide)
    with pytest.raises(LeptonError, match="no data set 'feat'"):
        m.predict(wide, x="feat")
    with pytest.raises(LeptonError, match=r"data file '.*absent.h5' does not exist"):
        m.predict(tmp_path / "absent.h5")
    bad = X.copy()
    bad[7, 2] = np.nan
    with pytest.raises(LeptonError, match=r"1 rows hold NaN or Inf \(first: row 7\)"):
        m.predict(bad)
    with pytest.raises(LeptonError, match=r"label 2 outside the classes 0\.\.1"):
        m.evaluate(X, np.where(y > 0, 2.0, 0.0))
    with pytest.raises(LeptonError, match="y has shape"):
        m.evaluate(X, y[:-1])
    with pytest.raises(LeptonError, match="give the targets y"):
        m.evaluate(X)
    with pytest.raises(LeptonError, match="not a real numeric type"):
        m.predict(np.array([["a"] * 5]))
    with pytest.raises(LeptonError, match="empty"):
        m.predict(np.zeros((0, 5)))
    with pytest.raises(LeptonError, match="x= names a data set"):
        m.predict(X, x="X")
    reg = load_model(root / "linear" / "model.h5")
    with pytest.raises(LeptonError, match="is a regression model"):
        reg.predict_proba(read(data_file(root, "linear"), "X")[0])


def test_onnx_missing_is_one_clear_error(root, tmp_path, monkeypatch):
    m = load_model(root / "softmax" / "model.h5")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(LeptonError) as err:
        m.to_onnx(tmp_path / "m.onnx")
    assert str(err.value) == "ONNX export needs the onnx package: pip install lepton_hpc[onnx]"
    assert not any(tmp_path.iterdir())


def test_works_in_a_plain_python_without_mpi(root):
    """No mpiexec and no MPI environment: the API never starts MPI (mpi4py stays unimported)."""
    model, test = root / "softmax" / "model.h5", data_file(root, "softmax")
    code = (
        "import sys, h5py\n"
        "from lepton_hpc.api.model import load_model\n"
        f"m = load_model({str(model)!r})\n"
        f"X = h5py.File({str(test)!r}, 'r')['X'][()]\n"
        f"assert (m.predict(X) == m.predict({str(test)!r})).all()\n"
        "m.evaluate(" + repr(str(test)) + ")\n"
        "assert 'mpi4py.MPI' not in sys.modules, 'MPI was imported'\n"
        "print('ok', m.predict(X)[:3].tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    (_, labels) = cli_outputs(root, "softmax")
    assert res.stdout.strip() == f"ok {labels[:3].tolist()}"

"""Inference on one rank against whole-array NumPy: forward (in chunks), evaluate, predict_one."""

import io

import h5py
import numpy as np
import pytest

from lepton_hpc import inference
from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data.preprocess import Scaler
from lepton_hpc.device import select_device
from lepton_hpc.log import Log
from lepton_hpc.models import Model
from lepton_hpc.models.io import save_model


def numpy_forward(model: Model, params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The model's outputs by whole-array NumPy (weights row-major fan_in x fan_out, then bias)."""
    a = np.asarray(X, dtype=np.float64)
    layers = model.layers()
    for i, (w, b, fan_in, fan_out) in enumerate(layers):
        z = a @ params[w].reshape(fan_in, fan_out) + params[b]
        a = np.tanh(z) if i < len(layers) - 1 else z
    if model.head == "softmax":
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if model.head == "binary":
        return 1.0 / (1.0 + np.exp(-a))
    return a


def small(head: str, sizes: tuple[int, ...], n: int = 150, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = Model("mlp", sizes, "tanh", head)
    params = rng.normal(0.0, 0.5, model.n_params)
    X = rng.normal(size=(n, sizes[0]))
    return model, params, X


@pytest.fixture(scope="module")
def device():
    return select_device("cpu", 1, SerialComm())


@pytest.mark.parametrize(
    ("head", "sizes"), [("squared", (4, 6, 2)), ("binary", (3, 5, 1)), ("softmax", (5, 7, 3))]
)
def test_forward_matches_numpy_across_chunks(head, sizes, device, monkeypatch):
    model, params, X = small(head, sizes)
    whole = inference.forward(model, params, X, device)
    monkeypatch.setattr(inference, "CHUNK_ROWS", 16)  # 150 rows: ten chunks, the last short
    chunked = inference.forward(model, params, X, device)
    assert chunked.shape == (150, model.n_outputs) and chunked.dtype == np.float64
    assert np.array_equal(chunked, whole)  # rows are independent: chunking changes no bit
    np.testing.assert_allclose(whole, numpy_forward(model, params, X), rtol=1e-10, atol=1e-12)


def test_evaluate_regression_matches_numpy(device):
    model, params, X = small("squared", (4, 3, 1))
    y = np.random.default_rng(1).normal(size=150)
    metrics = inference.evaluate(model, params, X, y, device, SerialComm())
    err = numpy_forward(model, params, X)[:, 0] - y
    assert metrics["rows"] == 150
    assert metrics["mse"] == pytest.approx(np.mean(err**2), rel=1e-12)
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
    r2 = 1.0 - np.sum(err**2) / np.sum((y - y.mean()) ** 2)
    assert metrics["r2"] == pytest.approx(r2, rel=1e-12)


def test_evaluate_classifier_matches_numpy(device):
    model, params, X = small("softmax", (5, 4, 3))
    y = np.random.default_rng(2).integers(0, 3, 150)
    metrics = inference.evaluate(model, params, X, y, device, SerialComm())
    prob = numpy_forward(model, params, X)
    assert metrics["accuracy"] == pytest.approx(np.mean(prob.argmax(axis=1) == y), abs=1e-15)
    log_loss = -np.mean(np.log(prob[np.arange(150), y]))
    assert metrics["log_loss"] == pytest.approx(log_loss, rel=1e-9)
    assert np.sum(metrics["confusion"]) == 150


def test_predict_one_writes_probabilities_and_labels(tmp_path):
    model, params, X = small("softmax", (3, 4, 3), n=40)
    shift, scale = np.array([0.5, -1.0, 2.0]), np.array([2.0, 1.0, 4.0])
    save_model(
        tmp_path / "model.h5",
        model,
        params,
        Scaler("zscore", shift, scale),
        {"config": {"data": {"x": "features"}}},
    )
    with h5py.File(tmp_path / "data.h5", "w") as fh:
        fh["features"] = X
    out = tmp_path / "pred.h5"
    log = Log(0, 1, stream=io.StringIO())
    args = (str(tmp_path / "model.h5"), str(tmp_path / "data.h5"), str(out))
    assert inference.predict_one(*args, SerialComm(), log, False) == str(out)
    expected = numpy_forward(model, params, (X - shift) / scale)
    with h5py.File(out, "r") as fh:
        np.testing.assert_allclose(fh["probabilities"][...], expected, rtol=1e-10, atol=1e-12)
        assert np.array_equal(fh["labels"][...], expected.argmax(axis=1))
        assert fh.attrs["head"] == "softmax" and fh.attrs["data"] == args[1]
    assert f"wrote {out}: 40 rows (probabilities and labels)" in log.stream.getvalue()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 32, 33])
def test_fused_logistic_metrics_are_the_bits_of_forward_then_sums(d, dtype):
    """A logistic model with up to 32 features is evaluated in one fused pass (outputs never
    stored): the same counts and exact sums as its forward pass followed by ``MetricSums``, on
    every tail of an eight-row group, and at 1 and 2 threads; 33 features take the plain path."""
    from lepton_hpc.metrics import MetricSums

    rng = np.random.default_rng(d)
    model = Model("logistic", (d, 1), "relu", "binary")
    params = rng.normal(0.0, 1.0, model.n_params)
    for n, threads in ((1, 1), (7, 1), (9, 2), (1003, 2), (50_001, 2)):
        X = rng.normal(size=(n, d)).astype(dtype)
        y = (rng.random(n) < 0.5).astype(np.float64)
        dev = select_device("cpu", threads, SerialComm())
        fused = MetricSums("binary", 2)
        inference.add_outputs(fused, model, params, X, y, dev)
        plain = MetricSums("binary", 2)
        plain.add(y, inference.forward(model, params, X, dev))
        assert np.array_equal(fused.cm, plain.cm), (n, d)
        assert np.array_equal(fused.sums.bins, plain.sums.bins), (n, d)
        assert fused.cm.sum() == n

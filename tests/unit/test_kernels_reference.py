"""``kernels.reference`` (plain @njit) against float64 NumPy and finite differences; the tuned CPU
kernels against it for every model, head, activation and dtype; and the fallback to it when the
tuned native code is not proven on this machine (``native.supported()`` false)."""

import numpy as np
import pytest
from lepton_hpc.kernels import (
    BINARY,
    RELU,
    SIGMOID,
    SOFTMAX,
    SQUARED,
    TANH,
    cpu,
    native,
    param_count,
    reference,
)

from lepton_hpc.device import Backend, CudaDevice, Device
from tests import reference as numpy_ref

HEADS = [(SQUARED, 1), (SQUARED, 3), (BINARY, 1), (SOFTMAX, 4)]  # (head, outputs)
ACTS = [SIGMOID, TANH, RELU]
DTYPES = [np.float32, np.float64]
# (hidden layers, activation): without a hidden layer the activation is unused
LAYERS = [(0, SIGMOID)] + [(h, act) for h in (1, 2, 3) for act in ACTS]


def problem(sizes, head, n, dtype=np.float64, seed=0, scale=0.5):
    """Random X (n, d), targets for the head, and parameters."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, dtype=np.int64)
    X = rng.standard_normal((n, int(sizes[0]))).astype(dtype)
    k = int(sizes[-1])
    if head == SQUARED:
        y = rng.standard_normal((n, k)) if k > 1 else rng.standard_normal(n)
    elif head == BINARY:
        y = (rng.random(n) < 0.5).astype(np.float64)
    else:
        y = rng.integers(0, k, n).astype(np.float64)
    return X, y, rng.standard_normal(param_count(sizes)) * scale, sizes


def grad(backend, X, y, params, sizes, act, head):
    out = np.full(params.size + 2, np.nan)
    backend.gradient(X, y, params, sizes, act, head, out)
    return out


def fwd(backend, X, params, sizes, act, head):
    out = np.full((X.shape[0], int(sizes[-1])), np.nan)
    backend.forward(X, params, sizes, act, head, out)
    return out


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def model_sizes(d, hidden, k):
    return (d, *[5 + 2 * i for i in range(hidden)], k)


# ---- (1) reference.py against float64 NumPy and finite differences -----------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("hidden", "act"), LAYERS)
@pytest.mark.parametrize(("head", "k"), HEADS)
def test_reference_matches_numpy(head, k, act, hidden, dtype):
    sizes = model_sizes(6, hidden, k)
    X, y, params, sizes = problem(sizes, head, 203, dtype, seed=hidden * 10 + k)
    out = grad(reference, X, y, params, sizes, act, head)
    g, loss, n = numpy_ref.gradient(X, y, params, sizes, act, head)
    P = params.size
    assert rel_err(out[:P], g) < 1e-12
    assert out[P] == pytest.approx(loss, rel=1e-12)
    assert out[P + 1] == n
    want, _ = numpy_ref.forward(X, params, sizes, act, head)
    assert rel_err(fwd(reference, X, params, sizes, act, head), want) < 1e-12
    assert reference.loss_sum(X, y, params, sizes, act, head) == out[P]


@pytest.mark.parametrize(("hidden", "act"), LAYERS)
@pytest.mark.parametrize(("head", "k"), HEADS)
def test_reference_gradient_is_the_derivative_of_its_loss(head, k, act, hidden):
    X, y, params, sizes = problem(model_sizes(4, hidden, k), head, 9, seed=hidden + 7 * k)
    if act == RELU:  # keep pre-activations away from the kink at 0
        params = params + 0.05 * np.sign(params)
    g = grad(reference, X, y, params, sizes, act, head)[: params.size]
    h = 1e-6
    for q in range(params.size):
        step = np.zeros(params.size)
        step[q] = h
        up = reference.loss_sum(X, y, params + step, sizes, act, head)
        down = reference.loss_sum(X, y, params - step, sizes, act, head)
        assert (up - down) / (2 * h) == pytest.approx(g[q], rel=1e-5, abs=1e-6), q


def test_reference_edge_cases():
    X, y, params, sizes = problem((3, 2), SOFTMAX, 4)
    y[2] = 5.0  # a label outside 0..k-1: NaN loss, no out-of-bounds read
    assert np.isnan(reference.loss_sum(X, y, params, sizes, SIGMOID, SOFTMAX))
    out = grad(reference, X[:0], y[:0], params, sizes, SIGMOID, SOFTMAX)
    assert not out.any()
    with pytest.raises(ValueError, match="out must be"):
        reference.gradient(X, y, params, sizes, SIGMOID, SOFTMAX, np.zeros(3))
    with pytest.raises(ValueError, match="BINARY head needs one output"):
        reference.loss_sum(X, y, params, sizes, SIGMOID, BINARY)
    big = np.array([[800.0, -800.0, 0.0]])  # saturated sigmoid and log-loss stay finite
    for head, yy in ((BINARY, np.array([1.0])), (SQUARED, np.array([0.0]))):
        out = grad(reference, big, yy, np.ones(4), np.array([3, 1]), SIGMOID, head)
        assert np.isfinite(out).all()


# ---- (2) the tuned CPU kernels against reference.py --------------------------------------------
@pytest.fixture
def tuned():
    ok, why = native.supported()
    if not ok:
        pytest.skip(f"the tuned kernels do not run here: {why}")
    return cpu


def assert_agree(X, y, params, sizes, act, head, tol=1e-12):
    got = grad(cpu, X, y, params, sizes, act, head)
    want = grad(reference, X, y, params, sizes, act, head)
    P = params.size
    assert rel_err(got[:P], want[:P]) < tol
    assert got[P] == pytest.approx(want[P], rel=tol, abs=1e-300)
    assert got[P + 1] == want[P + 1] == X.shape[0]
    assert cpu.loss_sum(X, y, params, sizes, act, head) == pytest.approx(want[P], rel=tol)
    f_got, f_want = (
        fwd(cpu, X, params, sizes, act, head),
        fwd(reference, X, params, sizes, act, head),
    )
    assert rel_err(f_got, f_want) < tol


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("hidden", "act"), LAYERS)
@pytest.mark.parametrize(("head", "k"), HEADS)
def test_tuned_kernels_match_reference(tuned, head, k, act, hidden, dtype):
    for n in (1, 3, 37, 1001, 5003):
        X, y, params, sizes = problem(model_sizes(9, hidden, k), head, n, dtype, seed=n + k)
        assert_agree(X, y, params, sizes, act, head)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            "tiles",  # run only with AVX-512; LLVM takes minutes to compile them for AVX2
            marks=pytest.mark.skipif(not native.has_avx512(), reason="tiles need AVX-512"),
        ),
        "panels",
        "pipeline",
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("head", [SQUARED, BINARY])
@pytest.mark.parametrize("d", [1, 7, 8, 32, 33, 100, 256])
def test_tuned_one_output_paths_match_reference(tuned, monkeypatch, path, dtype, head, d):
    """Linear and logistic through the register tiles (AVX-512, d <= 32; wider rows: 8-feature
    panels), the 4-feature panels (AVX2) and the pipelined pass."""
    monkeypatch.setattr(cpu, "USE_TILES", path == "tiles")  # else 4-feature panels (AVX2's)
    monkeypatch.setattr(cpu, "USE_PANELS", path != "pipeline")
    for n in (1, 5, 9, 131, 4099):
        X, y, params, sizes = problem((d, 1), head, n, dtype, seed=d * 7 + n, scale=0.3)
        assert_agree(X, y, params, sizes, SIGMOID, head)


# ---- (3) the fallback ---------------------------------------------------------------------------
@pytest.fixture
def fallback(monkeypatch):
    """native.supported() false, as on an untested llvmlite or CPU."""
    monkeypatch.setattr(native, "supported", lambda: (False, "forced by the test"))


@pytest.mark.parametrize(
    ("sizes", "act", "head"),
    [
        ((32, 1), SIGMOID, BINARY),  # logistic: the register-tile path when tuned
        ((5, 1), SIGMOID, SQUARED),
        ((8, 3), SIGMOID, SOFTMAX),
        ((6, 16, 8, 1), RELU, BINARY),
        ((6, 12, 2), TANH, SQUARED),
    ],
)
def test_fallback_runs_reference_and_agrees_with_tuned(monkeypatch, sizes, act, head):
    """Training-shaped calls (mini-batches of float32 rows) through a CPU Device: with the
    tuned code off every call is the reference's, bit for bit, and agrees with the tuned one."""
    device = Device("cpu", cpu)
    batches = [problem(sizes, head, m, np.float32, seed=m) for m in (256, 97, 1)]
    tuned_ok = native.supported()[0]
    tuned_runs = [grad(device, X, y, p, s, act, head) for X, y, p, s in batches]
    monkeypatch.setattr(native, "supported", lambda: (False, "forced by the test"))
    for (X, y, p, s), tuned_out in zip(batches, tuned_runs, strict=True):
        got = grad(device, X, y, p, s, act, head)
        np.testing.assert_array_equal(got, grad(reference, X, y, p, s, act, head))
        np.testing.assert_array_equal(
            fwd(device, X, p, s, act, head), fwd(reference, X, p, s, act, head)
        )
        assert cpu.loss_sum(X, y, p, s, act, head) == reference.loss_sum(X, y, p, s, act, head)
        if tuned_ok:
            assert rel_err(got, tuned_out) < 1e-12


def test_fallback_keeps_the_contract_checks(fallback):
    X, y, params, sizes = problem((4, 1), BINARY, 5)
    with pytest.raises(ValueError, match="params must have length"):
        cpu.gradient(X, y, params[:-1], sizes, SIGMOID, BINARY, np.zeros(params.size + 1))
    out = np.zeros(params.size + 2)
    cpu.gradient(X[:0], y[:0], params, sizes, SIGMOID, BINARY, out)
    assert not out.any()


def test_supported_says_why_not(monkeypatch):
    native._check.cache_clear()
    try:
        monkeypatch.setattr(native, "TESTED", {**native.TESTED, "numba": ((0, 1), (0, 2))})
        ok, why = native.supported()
        assert not ok and "numba" in why and "outside the tested range >=0.1,<0.2" in why
        native._check.cache_clear()
        monkeypatch.setattr(native, "TESTED", {"numba": ((0, 0), (99, 0))})
        monkeypatch.setattr(native, "REQUIRED_FEATURES", ("no-such-feature",))
        ok, why = native.supported()
        assert not ok and "no-such-feature" in why
    finally:
        native._check.cache_clear()
    assert native._release("0.62.0rc1") == (0, 62)
    assert native._release("1.2") == (1, 2)


def test_devices_are_backends():
    assert isinstance(Device("cpu", cpu), Backend)
    assert isinstance(CudaDevice("cuda", cpu), Backend)  # the protocol is structural

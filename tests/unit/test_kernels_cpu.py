"""CPU kernels against an independent whole-array float64 NumPy model, finite differences,
row-split additivity, thread-count determinism, and the accuracy of the vectorisable fast math."""

import itertools
import os
import platform
import subprocess
import sys

import numba
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
    cpu_tiles,
    fastmath,
    native,
    param_count,
)
from numba import njit

# The register tiles run only where the CPU has AVX-512 (``cpu.USE_TILES``): elsewhere their code
# is never chosen, and LLVM spends minutes compiling their 16-lane registers for 16 vector
# registers (about 7 of this file's minutes on a 2-core AMD EPYC guest), so their tests run
# where the tiles run.
TILES_HERE = pytest.mark.skipif(
    not native.has_avx512(), reason="the register tiles run only with AVX-512"
)

# (sizes, activation, head): one-layer fast paths, then MLPs with every hidden activation.
CASES = [
    ((5, 1), SIGMOID, SQUARED),
    ((5, 1), SIGMOID, BINARY),
    ((5, 3), SIGMOID, SOFTMAX),
    ((6, 4), SIGMOID, SOFTMAX),
    ((4, 2), SIGMOID, SQUARED),
] + [
    (sizes, act, head)
    for sizes, head in [((5, 7, 3, 1), BINARY), ((6, 8, 4), SOFTMAX), ((4, 6, 2), SQUARED)]
    for act in (SIGMOID, TANH, RELU)
]
CASE_IDS = [f"{'x'.join(map(str, s))}-a{a}-h{h}" for s, a, h in CASES]


# ------------------------------------------------------------------------- NumPy reference model


def _unpack(params, sizes):
    """List of (W, b) views of the flat parameter vector, contract layout."""
    layers, p0 = [], 0
    for w_in, w_out in itertools.pairwise(sizes):
        W = params[p0 : p0 + w_in * w_out].reshape(w_in, w_out)
        b = params[p0 + w_in * w_out : p0 + w_in * w_out + w_out]
        layers.append((W, b))
        p0 += w_in * w_out + w_out
    return layers


def _act(z, act):
    if act == SIGMOID:
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if act == TANH:
        return np.tanh(z)
    return np.maximum(z, 0.0)


def _act_grad(a, act):
    """Derivative of the activation, from its output a."""
    if act == SIGMOID:
        return a * (1.0 - a)
    if act == TANH:
        return 1.0 - a * a
    return (a > 0.0).astype(np.float64)


def reference(X, y, params, sizes, act, head):
    """(gradient sum, loss sum, output, pre-activations) in float64 by whole-array NumPy."""
    X = np.asarray(X, dtype=np.float64)
    layers = _unpack(np.asarray(params, dtype=np.float64), sizes)
    inputs, pre = [X], []
    a = X
    for idx, (W, b) in enumerate(layers):
        z = a @ W + b
        pre.append(z)
        if idx < len(layers) - 1:
            a = _act(z, act)
            inputs.append(a)
    n, k = z.shape
    if head == SQUARED:
        r = z - np.asarray(y, dtype=np.float64).reshape(n, k)
        loss, dz, out = float((r * r).sum()), 2.0 * r, z
    elif head == BINARY:
        t = np.asarray(y, dtype=np.float64)
        zz = z[:, 0]
        loss = float((np.logaddexp(0.0, zz) - t * zz).sum())
        p = 0.5 * (1.0 + np.tanh(0.5 * zz))
        dz, out = (p - t)[:, None], p[:, None]
    else:
        cls = np.asarray(y).astype(np.int64)
        zm = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(zm).sum(axis=1))
        prob = np.exp(zm - lse[:, None])
        loss = float((lse - zm[np.arange(n), cls]).sum())
        dz, out = prob - np.eye(k)[cls], prob
    grads = []
    for idx in range(len(layers) - 1, -1, -1):
        W, _ = layers[idx]
        grads.append(np.concatenate([(inputs[idx].T @ dz).ravel(), dz.sum(axis=0)]))
        if idx > 0:
            dz = (dz @ W.T) * _act_grad(inputs[idx], act)
    return np.concatenate(grads[::-1]), loss, out, pre


@pytest.fixture(params=["loops", "gemm"])
def mlp_path(request, monkeypatch):
    """Both CPU paths of an MLP: the loop nests and the BLAS GEMMs over row blocks."""
    monkeypatch.setattr(cpu, "GEMM_MIN_WIDTH", 10**9 if request.param == "loops" else 0)
    return request.param


# --------------------------------------------------------------------------------------- helpers


def make_problem(sizes, head, n, dtype=np.float64, seed=0):
    """Random X (n, d), targets for the head, and parameters of moderate scale. Past 256
    features the first layer's shrink as 1 / sqrt(d), to logits of about 2 standard deviations:
    a logistic row classified far beyond that has sigmoid(z) - y near float64's resolution of
    sigmoid(z) (1e-16 on values of 1e-5 and less), and no kernel can match a reference there
    to 1e-12."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, dtype=np.int64)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    k = int(sizes[-1])
    if head == SQUARED:
        y = rng.standard_normal((n, k)) if k > 1 else rng.standard_normal(n)
    elif head == BINARY:
        y = (rng.random(n) < 0.5).astype(np.float64)
    else:
        y = rng.integers(0, k, n).astype(np.float64)
    params = rng.standard_normal(param_count(sizes)) * 0.5
    d = int(sizes[0])
    if d > 256:
        params[: d * int(sizes[1])] *= (16 / d) ** 0.5
    return X, y, params, sizes


def run_gradient(X, y, params, sizes, act, head, products="float64"):
    out = np.full(len(params) + 2, np.nan)
    cpu.gradient(X, y, params, sizes, act, head, out, products)
    return out


def rel_err(a, b):
    """Largest absolute difference relative to the largest reference magnitude."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def loss_differences(X, y, params, sizes, act, head, h):
    """Central differences of the float64 loss (``cpu.loss_sum``) in every parameter."""
    fd = np.empty(len(params))
    for i in range(len(params)):
        step = np.zeros_like(params)
        step[i] = h
        up = cpu.loss_sum(X, y, params + step, sizes, act, head)
        down = cpu.loss_sum(X, y, params - step, sizes, act, head)
        fd[i] = (up - down) / (2 * h)
    return fd


# ------------------------------------------------------------------------------ gradient and loss


@pytest.mark.parametrize("n", [1, 7, 1001])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("sizes", "act", "head"), CASES, ids=CASE_IDS)
@pytest.mark.usefixtures("mlp_path")
def test_gradient_matches_reference(sizes, act, head, dtype, n):
    X, y, params, sizes = make_problem(sizes, head, n, dtype, seed=n)
    out = run_gradient(X, y, params, sizes, act, head)
    g_ref, loss_ref, _, _ = reference(X, y, params, sizes, act, head)
    P = len(params)
    tol = 1e-11  # float32 X is widened exactly; all arithmetic is float64 in both
    assert rel_err(out[:P], g_ref) < tol
    assert abs(out[P] - loss_ref) <= tol * abs(loss_ref)
    assert out[P + 1] == n


@pytest.mark.parametrize(
    ("sizes", "act", "head"), CASES[:2] + CASES[5:6], ids=CASE_IDS[:2] + CASE_IDS[5:6]
)
@pytest.mark.usefixtures("mlp_path")
def test_zero_rows(sizes, act, head):
    X, y, params, sizes = make_problem(sizes, head, 0)
    out = run_gradient(X, y, params, sizes, act, head)
    assert np.array_equal(out, np.zeros(len(params) + 2))
    assert cpu.loss_sum(X, y, params, sizes, act, head) == 0.0
    fwd = np.empty((0, int(sizes[-1])))
    cpu.forward(X, params, sizes, act, head, fwd)  # must not fail


@pytest.mark.parametrize("head", [SQUARED, BINARY])
def test_float32_large_matches_float64_reference(head):
    """10^5 float32 rows vs the float64 reference (1e-5 needed; float64 sums give ~1e-13)."""
    X, y, params, sizes = make_problem((32, 1), head, 100_000, np.float32, seed=3)
    out = run_gradient(X, y, params, sizes, SIGMOID, head)
    g_ref, loss_ref, _, _ = reference(X, y, params, sizes, SIGMOID, head)
    assert rel_err(out[:-2], g_ref) < 1e-10
    assert abs(out[-2] - loss_ref) < 1e-10 * loss_ref


def test_integer_labels_and_float32_targets():
    X, y, params, sizes = make_problem((6, 4), SOFTMAX, 301)
    expect = run_gradient(X, y, params, sizes, SIGMOID, SOFTMAX)
    np.testing.assert_array_equal(run_gradient(X, y.astype(np.int32), params, sizes, 0, 2), expect)
    X, y, params, sizes = make_problem((5, 1), SQUARED, 301, seed=4)
    g_ref, _, _, _ = reference(X, y.astype(np.float32), params, sizes, SIGMOID, SQUARED)
    out = run_gradient(X, y.astype(np.float32), params, sizes, SIGMOID, SQUARED)
    assert rel_err(out[:-2], g_ref) < 1e-12


@pytest.mark.parametrize("label", [3.0, -1.0, 1e9])
@pytest.mark.usefixtures("mlp_path")
def test_bad_softmax_label_gives_nan_loss(label):
    """Out-of-range class ids are not read out of bounds: the loss becomes NaN instead."""
    X, y, params, sizes = make_problem((5, 3), SOFTMAX, 10)
    y[4] = label
    assert np.isnan(run_gradient(X, y, params, sizes, SIGMOID, SOFTMAX)[-2])
    assert np.isnan(cpu.loss_sum(X, y, params, sizes, SIGMOID, SOFTMAX))


# ---------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize(("sizes", "act", "head"), CASES, ids=CASE_IDS)
@pytest.mark.usefixtures("mlp_path")
def test_finite_differences(sizes, act, head):
    """Central differences of loss_sum (float64) against every backward pass: rel. err < 1e-6."""
    for seed in range(11, 111):  # ReLU: first data set whose hidden pre-activations are all
        X, y, params, sizes = make_problem(sizes, head, 13, seed=seed)  # >= 1e-3 from the kink
        pre = reference(X, y, params, sizes, act, head)[3][:-1]
        if act != RELU or min(float(np.abs(z).min()) for z in pre) > 1e-3:
            break
    else:
        pytest.fail("no kink-free ReLU problem found")
    g = run_gradient(X, y, params, sizes, act, head)[: len(params)]
    assert rel_err(g, loss_differences(X, y, params, sizes, act, head, 1e-5)) < 1e-6


@pytest.mark.parametrize(("sizes", "act", "head"), CASES, ids=CASE_IDS)
@pytest.mark.usefixtures("mlp_path")
def test_loss_sum_equals_gradient_loss(sizes, act, head):
    X, y, params, sizes = make_problem(sizes, head, 517, seed=5)
    out = run_gradient(X, y, params, sizes, act, head)
    assert cpu.loss_sum(X, y, params, sizes, act, head) == pytest.approx(out[-2], rel=1e-13)


# ------------------------------------------------------------------ additivity and determinism


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    ("sizes", "act", "head"), CASES[:3] + CASES[6:7], ids=CASE_IDS[:3] + CASE_IDS[6:7]
)
@pytest.mark.usefixtures("mlp_path")
def test_row_split_additivity(sizes, act, head, dtype):
    """grad[0, a) + grad[a, n) == grad[0, n): what makes the allreduce over uneven ranks exact."""
    n, a = 3001, 1234
    X, y, params, sizes = make_problem(sizes, head, n, dtype, seed=7)
    whole = run_gradient(X, y, params, sizes, act, head)
    left = run_gradient(X[:a], y[:a], params, sizes, act, head)
    right = run_gradient(X[a:], y[a:], params, sizes, act, head)
    assert rel_err(left + right, whole) < 1e-12
    assert left[-1] + right[-1] == n


@pytest.mark.usefixtures("mlp_path")
def test_result_independent_of_thread_count():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 or more Numba threads")
    saved = numba.get_num_threads()
    X, y, params, sizes = make_problem((5, 7, 3, 1), BINARY, 20_001, seed=2)
    Xl, yl, pl, sl = make_problem((16, 1), BINARY, 200_001, np.float32, seed=2)
    try:
        results = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(
                (
                    run_gradient(X, y, params, sizes, TANH, BINARY),
                    run_gradient(Xl, yl, pl, sl, SIGMOID, BINARY),
                )
            )
    finally:
        numba.set_num_threads(saved)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


# -------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("sizes", "act", "head"), CASES, ids=CASE_IDS)
@pytest.mark.usefixtures("mlp_path")
def test_forward_matches_reference(sizes, act, head, dtype):
    X, y, params, sizes = make_problem(sizes, head, 1001, dtype, seed=9)
    out = np.full((1001, int(sizes[-1])), np.nan)
    cpu.forward(X, params, sizes, act, head, out)
    _, _, expect, _ = reference(X, y, params, sizes, act, head)
    np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-14)
    if head == SOFTMAX:
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-14)
    if head != SQUARED:
        assert out.min() >= 0.0
        assert out.max() <= 1.0


def test_rejects_bad_shapes():
    X, y, params, sizes = make_problem((5, 1), SQUARED, 10)
    with pytest.raises(ValueError, match="params"):
        run_gradient(X, y, params[:-1], sizes, SIGMOID, SQUARED)
    with pytest.raises(ValueError, match="BINARY"):
        cpu.loss_sum(X, y, np.zeros(param_count((5, 2))), (5, 2), SIGMOID, BINARY)
    with pytest.raises(ValueError, match="y must"):
        run_gradient(X, y[:-1], params, sizes, SIGMOID, SQUARED)


# ------------------------------------------------------------------------------------ fast math


def _vectorised(fn):
    """An array loop around a fastmath scalar function, compiled like the kernels compile it."""

    @njit(fastmath={"nsz", "arcp", "contract", "reassoc"}, error_model="numpy")
    def apply(x, out):
        for i in range(x.size):
            out[i] = fn(x[i])

    def call(x):
        out = np.empty_like(x)
        apply(x, out)
        return out

    call.apply = apply
    return call


def _max_rel(got, want):
    """Max relative error where the reference is a normal nonzero number."""
    mask = np.isfinite(want) & (np.abs(want) > 1e-300)
    return float(np.max(np.abs(got[mask] - want[mask]) / np.abs(want[mask])))


WIDE = np.concatenate(
    [
        np.linspace(-750.0, 720.0, 400_001),
        np.geomspace(1e-12, 2.0, 20_001),
        -np.geomspace(1e-12, 2.0, 20_001),
        [0.0],
    ]
)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fast_exp_and_expm1():
    got = _vectorised(fastmath.fast_exp)(WIDE)
    assert _max_rel(got, np.exp(WIDE)) < 1e-14
    assert np.all(got[WIDE < -745.2] == 0.0)
    assert np.all(np.isinf(got[WIDE > 709.8]))
    assert _vectorised(fastmath.fast_exp)(np.array([np.nan]))[0] != 0.0  # NaN stays NaN
    assert np.isnan(_vectorised(fastmath.fast_exp)(np.array([np.nan]))[0])
    grid = WIDE[WIDE < 709.0]
    assert _max_rel(_vectorised(fastmath.fast_expm1)(grid), np.expm1(grid)) < 5e-14


def test_fast_log_and_log1p():
    x = np.concatenate([np.geomspace(1e-310, 1e308, 300_001), np.linspace(0.5, 2.0, 100_001)])
    assert _max_rel(_vectorised(fastmath.fast_log)(x), np.log(x)) < 1e-14
    special = _vectorised(fastmath.fast_log)(np.array([0.0, np.inf, -1.0, np.nan]))
    assert special[0] == -np.inf
    assert special[1] == np.inf
    assert np.isnan(special[2:]).all()
    t = np.concatenate([np.linspace(0.0, 1.0, 200_001), np.geomspace(1e-300, 1.0, 10_001)])
    assert _max_rel(_vectorised(fastmath.log1p_unit)(t), np.log1p(t)) < 1e-14


def test_fast_softplus_sigmoid_tanh():
    sp = _vectorised(fastmath.fast_softplus)(WIDE)
    assert _max_rel(sp, np.logaddexp(0.0, WIDE)) < 1e-14
    assert np.all(np.isfinite(sp))
    sig_ref = np.where(WIDE >= 0, 1.0, np.exp(np.minimum(WIDE, 0))) / (1.0 + np.exp(-np.abs(WIDE)))
    sig = _vectorised(fastmath.fast_sigmoid)(WIDE)
    assert _max_rel(sig, sig_ref) < 1e-14
    assert sig.min() >= 0.0
    assert sig.max() <= 1.0
    assert _max_rel(_vectorised(fastmath.fast_tanh)(WIDE), np.tanh(WIDE)) < 5e-14


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly check")
def test_fast_softplus_loop_is_vectorised():
    """The point of fastmath: a loop over it compiles to packed (SIMD) double arithmetic."""
    fn = _vectorised(fastmath.fast_softplus)
    fn(np.linspace(-3.0, 3.0, 64))
    asm = fn.apply.inspect_asm(fn.apply.signatures[0])
    packed = [line for line in asm.splitlines() if "pd\t" in line and "mm" in line]
    assert any(op in line for line in packed for op in ("vfmadd", "vmulpd", "mulpd"))


# ---------------------------------------------- one-output models: register tiles and pipeline


@pytest.mark.parametrize("path", [pytest.param("tiles", marks=TILES_HERE), "panels", "pipeline"])
@pytest.mark.parametrize("head", [SQUARED, BINARY])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 24, 31, 32, 33])
def test_one_output_paths_match_reference(monkeypatch, path, head, dtype, d):
    """Every one-output path (tiles, panels, pipeline), every feature-tile boundary, every tail
    of a group of rows: the gradient, and the forward pass (outputs) that evaluation runs."""
    monkeypatch.setattr(cpu, "USE_TILES", path == "tiles")  # else 4-feature panels (AVX2's)
    monkeypatch.setattr(cpu, "USE_PANELS", path != "pipeline")
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 17, 130, 1001):
        X, y, params, sizes = make_problem((d, 1), head, n, dtype, seed=d * 1000 + n)
        out = run_gradient(X, y, params, sizes, SIGMOID, head)
        g_ref, loss_ref, want, _ = reference(X, y, params, sizes, SIGMOID, head)
        P = len(params)
        assert rel_err(out[:P], g_ref) < 1e-12, (n, d)
        assert abs(out[P] - loss_ref) <= 1e-12 * abs(loss_ref), (n, d)
        assert out[P + 1] == n
        fwd = np.full((n, 1), np.nan)
        cpu.forward(X, params, sizes, SIGMOID, head, fwd)
        np.testing.assert_allclose(fwd, want, rtol=1e-12, atol=1e-14, err_msg=f"{n} rows, d {d}")


def assert_same_bits_on_1_and_2_threads(X, y, params, sizes, head, products="float64"):
    """The gradient on 1 and on 2 Numba threads has the same bits (skipped with one thread)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        return
    saved = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            runs.append(run_gradient(X, y, params, sizes, SIGMOID, head, products))
    finally:
        numba.set_num_threads(saved)
    np.testing.assert_array_equal(runs[0], runs[1])


TILE_KERNELS = {  # name: (kernel, the widest rows it takes)
    "4 rows": (cpu_tiles._one_output_tiles, 32),
    "16 rows, 2 tiles": (cpu_tiles._one_output_tiles16_2, 16),
    "32 rows, 1 tile": (cpu_tiles._one_output_tiles32_1, 8),
}
PANELS = {  # kernel: feature counts (every panel tail)
    "8 features": (cpu_tiles._one_output_panels, (33, 39, 40, 64, 65, 127, 1023, 1024, 257)),
    "4 features": (cpu_tiles._one_output_panels4, (1, 3, 4, 5, 8, 31, 33, 1021, 1024, 70)),
    "4 features, pipelined": (
        cpu_tiles._one_output_pipelined4,
        (1, 3, 4, 5, 8, 31, 33, 1021, 1024, 70),
    ),
    "4 features, 16 rows": (
        cpu_tiles._one_output_panels4x16,
        (1, 3, 4, 5, 8, 13, 16, 31, 33, 34, 35, 36, 37, 39, 40, 32),
    ),
}


@pytest.mark.parametrize("kernel", list(PANELS))
@pytest.mark.parametrize("head", [SQUARED, BINARY])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_panels_match_reference(monkeypatch, kernel, head, dtype):
    """The feature-panel kernels (8 features a panel: d > 40 on AVX-512; 4: AVX2; 4 in groups
    of 16 rows: up to 40 features on both): gradient and loss against the float64 reference for every
    tail of their panels and of their row groups, and the same bits for 1 and 2 threads."""
    chosen, feature_counts = PANELS[kernel]
    monkeypatch.setattr(cpu, "USE_TILES", False)
    monkeypatch.setattr(cpu, "USE_PANELS", True)
    monkeypatch.setattr(cpu, "_panels", lambda X: (chosen, 8))
    for d in feature_counts:
        for n in (1, 7, 8, 9, 15, 16, 17, 203):
            X, y, params, sizes = make_problem((d, 1), head, n, dtype, seed=3 * d + n)
            out = run_gradient(X, y, params, sizes, SIGMOID, head)
            g_ref, loss_ref, _, _ = reference(X, y, params, sizes, SIGMOID, head)
            P = len(params)
            assert rel_err(out[:P], g_ref) < 1e-12, (d, n)
            assert abs(out[P] - loss_ref) <= 1e-12 * abs(loss_ref), (d, n)
    X, y, params, sizes = make_problem((feature_counts[-1], 1), head, 30_011, dtype, seed=9)
    assert_same_bits_on_1_and_2_threads(X, y, params, sizes, head)


TAKEN = {  # the kernels that also read rows in place, and their feature counts
    "4 features": (cpu_tiles._one_output_panels4, (1, 3, 4, 5, 33, 70)),
    "4 features, pipelined": (cpu_tiles._one_output_pipelined4, (1, 3, 4, 5, 33, 70)),
    "4 features, 16 rows": (
        cpu_tiles._one_output_panels4x16,
        (1, 3, 5, 8, 13, 16, 31, 32, 33, 36, 37, 40),
    ),
}


@pytest.mark.parametrize("kernel", list(TAKEN))
@pytest.mark.parametrize("head", [SQUARED, BINARY])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_read_in_place_give_the_bits_of_the_copied_rows(monkeypatch, kernel, head, dtype):
    """``gradient_rows``: a mini-batch's rows read where they are (``cpu_tiles._taken_*``)
    give the same bits as ``gradient`` on a copy of them, for every tail of the panels, of the
    row groups and of the chunks; rows ascending (as training's batches) or in any order and
    repeated (int32, as training's batches: int64 positions would compile each kernel again);
    against the float64 reference; on 1 and 2 threads; no rows."""
    chosen, feature_counts = TAKEN[kernel]
    monkeypatch.setattr(cpu, "USE_TILES", False)
    monkeypatch.setattr(cpu, "USE_PANELS", True)
    monkeypatch.setattr(cpu, "_panels", lambda X: (chosen, 8))
    rng = np.random.default_rng(5)
    for d in feature_counts:
        X, y, params, sizes = make_problem((d, 1), head, 3_000, dtype, seed=d)
        taken = cpu.taken_rows(X, y, sizes, head)
        assert taken is not None and taken.kernel is cpu._TAKEN[chosen], d
        P = len(params)
        for n in (1, 7, 8, 9, 15, 16, 17, 203, 2_900):
            for rows in (
                np.sort(rng.choice(3_000, n, replace=False)).astype(np.int32),
                rng.integers(0, 3_000, n).astype(np.int32),  # any order, repeats
            ):
                got = np.full(P + 2, np.nan)
                cpu.gradient_rows(taken, rows, params, got)
                want = run_gradient(X[rows], y[rows], params, sizes, SIGMOID, head)
                np.testing.assert_array_equal(got, want, err_msg=f"d {d}, {n} rows")
                g_ref, loss_ref, _, _ = reference(X[rows], y[rows], params, sizes, SIGMOID, head)
                assert rel_err(got[:P], g_ref) < 1e-12, (d, n)
                assert abs(got[P] - loss_ref) <= 1e-12 * abs(loss_ref), (d, n)
    none = np.full(P + 2, np.nan)
    cpu.gradient_rows(taken, np.zeros(0, np.int32), params, none)
    assert not none.any()
    if numba.config.NUMBA_NUM_THREADS >= 2:
        rows = rng.integers(0, 3_000, 2_999).astype(np.int32)
        runs, saved = [], numba.get_num_threads()
        try:
            for threads in (1, 2):
                numba.set_num_threads(threads)
                runs.append(np.empty(P + 2))
                cpu.gradient_rows(taken, rows, params, runs[-1])
        finally:
            numba.set_num_threads(saved)
        np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("head", [SQUARED, BINARY])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pipelined_avx2_groups_give_the_bits_of_the_two_passes(monkeypatch, head, dtype):
    """The AVX2 wide-row kernel runs its 8-row groups in two passes or pipelined, by the CPU
    (``cpu.PIPELINED``): both add each gradient element's rows one after the other, so a user's
    results do not depend on which ran. Every tail of the panels, of the groups and of the
    chunks (one group to several chunks), both heads, both row types."""
    monkeypatch.setattr(cpu, "USE_TILES", False)
    monkeypatch.setattr(cpu, "USE_PANELS", True)
    problems = [
        make_problem((d, 1), head, n, dtype, seed=d + n)
        for d in (41, 42, 43, 44, 45, 48, 64, 70, 257, 1024)
        for n in (1, 7, 8, 9, 16, 17, 8_200)
    ]
    runs = []
    for kernel in (cpu_tiles._one_output_panels4, cpu_tiles._one_output_pipelined4):
        monkeypatch.setattr(cpu, "_panels", lambda X, k=kernel: (k, 0))
        runs.append([run_gradient(X, y, p, s, SIGMOID, head) for X, y, p, s in problems])
    for (X, _, _, _), two, piped in zip(problems, *runs, strict=True):
        np.testing.assert_array_equal(two, piped, err_msg=f"{X.shape}")


def test_rows_are_copied_where_no_kernel_reads_them_in_place(monkeypatch):
    """``taken_rows`` says None (copy the batch) for the models and paths without a kernel on
    rows in place: MLPs and softmax, float32 products on wide float32 rows, the register
    tiles, the 8-feature panels, rows not C-ordered, and the reference kernels."""
    monkeypatch.setattr(cpu, "USE_TILES", False)
    X, y, _, sizes = make_problem((40, 1), BINARY, 50, np.float32)
    assert cpu.taken_rows(X, y, sizes, BINARY) is not None
    assert cpu.taken_rows(X, y, sizes, BINARY, "float32") is not None  # float64 panels
    X48, y48, _, _ = make_problem((48, 1), BINARY, 50, np.float32)
    assert cpu.taken_rows(X48, y48, np.array([48, 1]), BINARY, "float32") is None
    assert cpu.taken_rows(X[:, ::2], y, np.array([20, 1]), BINARY) is None
    assert cpu.taken_rows(X, y, np.array([40, 8, 1]), BINARY) is None
    assert cpu.taken_rows(X, y, np.array([40, 3]), SOFTMAX) is None
    monkeypatch.setattr(cpu, "_panels", lambda X: (cpu_tiles._one_output_panels, 8))
    assert cpu.taken_rows(X, y, sizes, BINARY) is None
    monkeypatch.setattr(cpu, "USE_TILES", True)
    assert cpu.taken_rows(X[:, :8].copy(), y, np.array([8, 1]), BINARY) is None
    assert cpu.taken_rows(X[:, :32].copy(), y, np.array([32, 1]), SQUARED) is None
    monkeypatch.setattr(cpu.native, "supported", lambda: (False, "test"))
    assert cpu.taken_rows(X, y, sizes, BINARY) is None


@TILES_HERE
@pytest.mark.parametrize("kernel", list(TILE_KERNELS))
@pytest.mark.parametrize("head", [SQUARED, BINARY])
def test_every_tile_kernel_matches_reference_for_both_heads(monkeypatch, kernel, head):
    """gradient() picks a tile kernel by d and head (``cpu_tiles.tiles_kernel``); each kernel is
    exact for either head on every d it takes (each tail of its feature tiles), every row tail
    of its group, float32 and float64."""
    monkeypatch.setattr(cpu, "USE_TILES", True)
    chosen, widest = TILE_KERNELS[kernel]
    monkeypatch.setattr(cpu, "tiles_kernel", lambda d: chosen)
    monkeypatch.setattr(cpu, "_tiled", lambda d, binary: True)
    cases = [
        (d, n) for d in (1, 5, 8, 9, 15, 16, 17, 31, 32) if d <= widest for n in (1, 9, 31, 33)
    ]
    for dtype in (np.float32, np.float64):
        for d, n in [*cases, (widest, 1003), (widest - 3, 23)]:
            X, y, params, sizes = make_problem((d, 1), head, n, dtype, seed=7 * d + n)
            out = run_gradient(X, y, params, sizes, SIGMOID, head)
            g_ref, loss_ref, _, _ = reference(X, y, params, sizes, SIGMOID, head)
            P = len(params)
            assert rel_err(out[:P], g_ref) < 1e-12, (d, n)
            assert abs(out[P] - loss_ref) <= 1e-12 * abs(loss_ref), (d, n)


@TILES_HERE
def test_narrow_tile_kernels_are_chosen_and_forward_has_their_logits(monkeypatch):
    """d <= 8 and d <= 16 run the one- and two-register kernels; the forward pass computes each
    row's logit as the gradient kernel does (a row's loss from the gradient's sum equals the
    loss from the outputs to the last bit when a single row is summed)."""
    assert cpu_tiles.tiles_kernel(8) is cpu_tiles._one_output_tiles32_1
    assert cpu_tiles.tiles_kernel(9) is cpu_tiles._one_output_tiles16_2
    assert cpu_tiles.tiles_kernel(17) is cpu_tiles._one_output_tiles
    # with AVX-512, 17-40 features run the 4-feature panels (16-row groups) instead, but the
    # squared head's four-row tiles at 29-32
    assert [d for d in range(1, 50) if cpu._tiled(d, False)] == [*range(1, 17), 29, 30, 31, 32]
    assert [d for d in range(1, 50) if cpu._tiled(d, True)] == [*range(1, 17)]
    widths = (17, 28, 29, 32, 33, 40, 41)
    panels4x16 = (17, 28, 29, 32, 33, 40)  # with AVX-512 and on AVX2 alike
    for avx512, pipelined, prefetched, wider in (
        (True, False, [17, 28], cpu_tiles._one_output_panels),
        (True, True, [17, 28], cpu_tiles._one_output_panels),
        (False, False, [17, 28, 29, 32], cpu_tiles._one_output_panels4),
        (False, True, [17, 28, 29, 32], cpu_tiles._one_output_pipelined4),
    ):
        monkeypatch.setattr(cpu, "USE_TILES", avx512)
        monkeypatch.setattr(cpu, "PIPELINED", pipelined)
        kernels = {d: cpu._panels(np.zeros((4, d), np.float32)) for d in widths}
        assert {d: k for d, (k, _) in kernels.items()} == {
            d: cpu_tiles._one_output_panels4x16 if d in panels4x16 else wider for d in widths
        }
        assert [d for d, (_, ahead) in kernels.items() if ahead] == prefetched
    monkeypatch.setattr(cpu, "USE_TILES", True)
    for d in (3, 8, 12, 16):
        X, y, params, sizes = make_problem((d, 1), SQUARED, 1, np.float32, seed=d)
        out = run_gradient(X, y, params, sizes, SIGMOID, SQUARED)
        fwd = np.empty((1, 1))
        cpu.forward(X, params, sizes, SIGMOID, SQUARED, fwd)
        # the squared head's gradient is 2 (z - y): z recovered from it exactly
        assert out[len(params) - 1] == 2.0 * (fwd[0, 0] - float(y.reshape(-1)[0])), d


@TILES_HERE
def test_tiles_float32_targets_and_thread_count(monkeypatch):
    """Tile kernel: float32 y is read as float32; 1 and 2 threads give bitwise the same sums."""
    monkeypatch.setattr(cpu, "USE_TILES", True)
    X, y, params, sizes = make_problem((13, 1), BINARY, 50_003, np.float32, seed=5)
    out32 = run_gradient(X, y.astype(np.float32), params, sizes, SIGMOID, BINARY)
    np.testing.assert_array_equal(out32, run_gradient(X, y, params, sizes, SIGMOID, BINARY))
    assert_same_bits_on_1_and_2_threads(X, y, params, sizes, BINARY)


@TILES_HERE
def test_tiles_nonfinite_logits_propagate(monkeypatch):
    """A NaN or inf in X shows as a NaN loss (no fast-math assumption hides it)."""
    monkeypatch.setattr(cpu, "USE_TILES", True)
    for bad in (np.nan, np.inf):
        for head in (SQUARED, BINARY):
            X, y, params, sizes = make_problem((32, 1), head, 37, seed=1)
            X[35, 31] = bad
            out = run_gradient(X, y, params, sizes, SIGMOID, head)
            assert np.isnan(out[len(params)]) or np.isinf(out[len(params)])


_CACHED_RUN = """
import hashlib, sys
import numpy as np
from lepton_hpc.kernels import BINARY, SIGMOID, SQUARED, cpu
cpu.USE_TILES = True
rng = np.random.default_rng(5)
X = rng.standard_normal((20_003, 13)).astype(np.float32)
y = (rng.random(20_003) < 0.5).astype(np.float64)
p = rng.standard_normal(14) * 0.5
digest = hashlib.sha256()
for head in (SQUARED, BINARY):
    out = np.zeros(16)
    cpu.gradient(X, y, p, np.array([13, 1]), SIGMOID, head, out)
    digest.update(out.tobytes())
print(digest.hexdigest())
"""


@TILES_HERE
def test_tiles_same_bits_compiled_and_from_cache(tmp_path):
    """The tile kernel compiled in a process and loaded from Numba's cache in the next one gives
    the same bits (with fast-math flags on this parallel function, the two differed by 1 ulp)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", _CACHED_RUN],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert any(tmp_path.rglob("*.nbc")), "the first run should have written the cache"
    assert runs[0].stdout == runs[1].stdout


# ------------------------------------------------------------------ the GEMM path of wide MLPs

WIDE_MLPS = [((32, 64, 32, 1), BINARY), ((24, 96, 5), SOFTMAX), ((9, 70, 2), SQUARED)]
WIDE_PATHS = ((RELU, np.float32), (TANH, np.float64), (SIGMOID, np.float32))  # act, X dtype


def check_wide_mlp(sizes, head, n, act, dtype, products, tol, seed=None):
    """The gradient with ``products`` against the float64 NumPy model (relative ``tol``), and
    the outputs (float64 products whatever ``products``) to 1e-12; returns the problem and the
    gradient's ``out``."""
    X, y, params, sizes_a = make_problem(sizes, head, n, dtype, seed=n if seed is None else seed)
    params *= 0.3
    out = np.full(len(params) + 2, np.nan)
    cpu.gradient(X, y, params, sizes_a, act, head, out, products)
    g_ref, loss_ref, expect, _ = reference(X, y, params, sizes_a, act, head)
    P = len(params)
    assert rel_err(out[:P], g_ref) < tol
    assert abs(out[P] - loss_ref) <= tol * abs(loss_ref)
    assert out[P + 1] == n
    got = np.full((n, int(sizes_a[-1])), np.nan)
    cpu.forward(X, params, sizes_a, act, head, got)
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-14)
    return X, y, params, sizes_a, out


@pytest.mark.parametrize("n", [1, 63, 64, 65, 257, 4097, 70_001])
@pytest.mark.parametrize(("sizes", "head"), WIDE_MLPS, ids=["binary", "softmax", "squared"])
def test_wide_mlps_take_the_gemm_path_and_match_reference(monkeypatch, sizes, head, n):
    """Shapes across the block plan's edges (small batches cut finer, many chunks); float32
    rows widened; every activation."""
    assert cpu._gemm(np.asarray(sizes))  # the default rule sends these to the GEMMs
    calls = []
    real = cpu.cpu_gemm.gradient_partials
    monkeypatch.setattr(cpu.cpu_gemm, "gradient_partials", lambda *a: calls.append(1) or real(*a))
    for act, dtype in WIDE_PATHS:
        X, y, params, sizes_a, out = check_wide_mlp(sizes, head, n, act, dtype, "float64", 1e-11)
        loss = cpu.loss_sum(X, y, params, sizes_a, act, head)
        assert loss == pytest.approx(out[len(params)], rel=1e-13)
    assert len(calls) == 3


def test_gemm_path_bits_do_not_depend_on_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 or more Numba threads")
    saved = numba.get_num_threads()
    problems = [make_problem((33, 80, 40, 1), BINARY, n, np.float32, seed=n) for n in (200, 90_001)]
    try:
        results = []
        for threads in (1, 2, 1):
            numba.set_num_threads(threads)
            results.append([run_gradient(X, y, p, s, RELU, BINARY) for X, y, p, s in problems])
    finally:
        numba.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_gemm_plan_depends_on_rows_and_model_only():
    from lepton_hpc.kernels import cpu_gemm

    sizes = [256, 256, 256, 1]
    assert cpu_gemm.plan(256, sizes) == (64, 1, 4)  # a mini-batch is cut for the threads
    assert cpu_gemm.plan(256, sizes, 4) == (128, 1, 2)  # float32 blocks hold twice the rows
    assert cpu_gemm.plan(256, [256, 64, 32, 1]) == (128, 1, 2)  # equal blocks, not 180 + 76
    assert cpu_gemm.plan(1, sizes) == (1, 1, 1)
    block, per, chunks = cpu_gemm.plan(1_000_000, sizes)
    assert block * per * chunks >= 1_000_000 and chunks <= cpu_gemm.MAX_CHUNKS
    assert block * per * (chunks - 1) < 1_000_000


# ------------------------------------------------------------ float32 products (train.products)


@pytest.mark.parametrize("n", [1, 65, 5_000])
@pytest.mark.parametrize(("sizes", "head"), WIDE_MLPS, ids=["binary", "softmax", "squared"])
def test_float32_products_are_within_1e_6_of_the_float64_reference(sizes, head, n):
    for act, dtype in WIDE_PATHS:
        check_wide_mlp(sizes, head, n, act, dtype, "float32", 1e-6, seed=n + 1)


def test_float32_products_finite_differences_of_their_own_loss():
    """The float32-product gradient against central differences of the float64 loss: the
    products' rounding is the only difference (1e-5 with h = 1e-4)."""
    X, y, params, sizes = make_problem((6, 64, 1), BINARY, 40, seed=4)
    params *= 0.3
    out = np.zeros(len(params) + 2)
    cpu.gradient(X, y, params, sizes, TANH, BINARY, out, "float32")
    fd = loss_differences(X, y, params, sizes, TANH, BINARY, 1e-4)
    assert rel_err(out[: len(params)], fd) < 1e-5


def test_float32_products_bits_do_not_depend_on_threads_and_leave_other_paths_alone():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 or more Numba threads")
    saved = numba.get_num_threads()
    wide = make_problem((33, 80, 40, 1), BINARY, 30_001, np.float32, seed=3)
    try:
        results = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            out = np.zeros(len(wide[2]) + 2)
            cpu.gradient(*wide, RELU, BINARY, out, "float32")
            results.append(out)
    finally:
        numba.set_num_threads(saved)
    np.testing.assert_array_equal(results[0], results[1])
    assert rel_err(results[0], run_gradient(*wide, RELU, BINARY)) > 1e-12  # float32 indeed
    for widths, head in (((5, 7, 3, 1), BINARY), ((16, 1), BINARY), ((6, 4), SOFTMAX)):
        X, y, params, sizes = make_problem(widths, head, 1001, np.float32, seed=5)
        out = np.zeros(len(params) + 2)
        cpu.gradient(X, y, params, sizes, TANH, head, out, "float32")
        np.testing.assert_array_equal(out, run_gradient(X, y, params, sizes, TANH, head))


def test_float32_products_follow_each_calls_parameters():
    """The float32 copy of the parameters is kept between calls (in a thread's own array):
    each call reads its own parameters, whatever model or parameters came before."""
    from lepton_hpc.kernels import cpu_gemm

    X, y, params, sizes = make_problem((33, 80, 40, 1), BINARY, 700, np.float32, seed=6)
    other = make_problem((20, 96, 33, 1), BINARY, 300, np.float32, seed=7)
    assert cpu._gemm(sizes) and cpu._gemm(other[3])

    def run(p):
        out = np.zeros(len(p) + 2)
        cpu.gradient(X, y, p, sizes, RELU, BINARY, out, "float32")
        return out

    values = [params, params * 0.5, params * 2.0]
    fresh = []
    for p in values:
        cpu_gemm._local.narrow = None  # as if nothing ran before
        fresh.append(run(p))
    assert min(rel_err(fresh[0], fresh[1]), rel_err(fresh[0], fresh[2])) > 1e-3
    for at in (0, 2, 1, 1, 0, 2):  # the same model with other values, or another model between
        if at == 1:
            cpu.gradient(*other, RELU, BINARY, np.zeros(len(other[2]) + 2), "float32")
        np.testing.assert_array_equal(run(values[at]), fresh[at])


@pytest.mark.parametrize("head", [SQUARED, BINARY])
def test_float32_products_one_output_wide_rows_match_reference(monkeypatch, head):
    """One-output models on float32 rows wider than the tiles (``cpu_float32``): every tail of
    the 8-row groups and of the vectorised feature loops, against the float64 reference to 1e-6;
    the kernel is the one that ran, and its results differ from the float64 path's."""
    calls = []
    real = cpu.one_output_float32
    monkeypatch.setattr(cpu, "one_output_float32", lambda *a: calls.append(1) or real(*a))
    for d in (41, 47, 48, 64, 65, 127, 257, 1024):
        for n in (1, 7, 8, 9, 15, 16, 17, 203, 4099):
            X, y, params, sizes = make_problem((d, 1), head, n, np.float32, seed=7 * d + n)
            out = run_gradient(X, y, params, sizes, SIGMOID, head, "float32")
            g_ref, loss_ref, _, _ = reference(X, y, params, sizes, SIGMOID, head)
            P = len(params)
            assert rel_err(out[:P], g_ref) < 1e-6, (d, n)
            assert abs(out[P] - loss_ref) <= 1e-6 * abs(loss_ref), (d, n)
            assert out[P + 1] == n
        assert rel_err(out, run_gradient(X, y, params, sizes, SIGMOID, head)) > 1e-12
    assert len(calls) == 8 * 9
    X, y, params, sizes = make_problem((129, 1), head, 30_011, np.float32, seed=9)
    assert_same_bits_on_1_and_2_threads(X, y, params, sizes, head, "float32")


def test_float32_products_one_output_only_on_wide_float32_rows(monkeypatch):
    """float64 rows, and float32 rows up to 40 features, keep the float64 kernels (same bits)."""
    monkeypatch.setattr(cpu, "one_output_float32", lambda *a: pytest.fail("float32 kernel ran"))
    cases = ((32, np.float32), (8, np.float32), (33, np.float32), (40, np.float32))
    for d, dtype in (*cases, (33, np.float64), (300, np.float64)):
        X, y, params, sizes = make_problem((d, 1), BINARY, 1001, dtype, seed=d)
        np.testing.assert_array_equal(
            run_gradient(X, y, params, sizes, SIGMOID, BINARY, "float32"),
            run_gradient(X, y, params, sizes, SIGMOID, BINARY),
        )


def test_float32_products_one_output_finite_differences_and_nonfinite_rows():
    """The float32-product gradient of a logistic model on 100 features against central
    differences of the float64 loss (1e-5 with h = 1e-4); a NaN or inf in a row reaches the
    gradient and the loss instead of being lost in the float32 sums."""
    X, y, params, sizes = make_problem((100, 1), BINARY, 61, np.float32, seed=4)
    out = run_gradient(X, y, params, sizes, SIGMOID, BINARY, "float32")
    fd = loss_differences(X, y, params, sizes, SIGMOID, BINARY, 1e-4)
    assert rel_err(out[: len(params)], fd) < 1e-5
    for bad in (np.nan, np.inf):
        Xb = X.copy()
        Xb[17, 40] = bad
        out = run_gradient(Xb, y, params, sizes, SIGMOID, BINARY, "float32")
        assert not np.isfinite(out[: len(params) + 1]).all(), bad


def test_a_rows_output_does_not_depend_on_how_the_rows_are_split():
    """Predictions on 1 or 3 ranks, or in batches, give each row the same bits: a wide MLP's
    outputs do not go through BLAS, whose rows depend on the product's row count."""
    X, _, params, sizes = make_problem((20, 96, 3), SOFTMAX, 2_000, np.float32, seed=8)
    whole = np.empty((2_000, 3))
    cpu.forward(X, params, sizes, RELU, SOFTMAX, whole)
    for a, b in ((0, 1), (1, 8), (8, 675), (675, 1333), (1333, 2_000)):
        part = np.empty((b - a, 3))
        cpu.forward(X[a:b], params, sizes, RELU, SOFTMAX, part)
        assert part.tobytes() == whole[a:b].tobytes()

"""Optimisers against their textbook update rules, and L-BFGS (built by the same registry) on
problems with a known optimum."""

import numpy as np
import pytest

from lepton_hpc.config import OptimConfig
from lepton_hpc.optim import OPTIMIZERS, make_optimizer, optimizer_class
from lepton_hpc.optim.lbfgs import LBFGS


def run(name, grads, **kw):
    cfg = OptimConfig(name=name, **kw)
    opt = make_optimizer(cfg, 3)
    p = np.array([1.0, -2.0, 0.5])
    for g in grads:
        opt.step(p, np.asarray(g, dtype=float))
    return p, opt


GRADS = [[0.1, -0.2, 0.3], [0.05, 0.1, -0.4], [-0.3, 0.2, 0.1]]


def test_sgd():
    p, _ = run("sgd", GRADS, lr=0.5)
    assert np.allclose(
        p, np.array([1.0, -2.0, 0.5]) - 0.5 * np.sum(GRADS, axis=0), rtol=0, atol=1e-15
    )


def test_momentum():
    p, _ = run("momentum", GRADS, lr=0.1, momentum=0.9)
    ref, v = np.array([1.0, -2.0, 0.5]), np.zeros(3)
    for g in GRADS:
        v = 0.9 * v + np.asarray(g)
        ref = ref - 0.1 * v
    assert np.allclose(p, ref, rtol=0, atol=1e-15)


def test_adam_bias_corrected():
    p, _ = run("adam", GRADS, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    ref, m, v = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
    for t, g in enumerate(map(np.asarray, GRADS), start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    assert np.allclose(p, ref, rtol=0, atol=1e-15)
    # first step moves every coordinate by about lr (bias correction at work)
    q, _ = run("adam", GRADS[:1], lr=0.01)
    assert np.allclose(np.abs(q - [1.0, -2.0, 0.5]), 0.01, rtol=1e-6)


def test_state_round_trip_continues_identically():
    p1, opt1 = run("adam", GRADS[:2], lr=0.01)
    opt2 = make_optimizer(OptimConfig(name="adam", lr=0.01), 3)
    opt2.load_state({k: np.copy(v) for k, v in opt1.state().items()})
    p2 = p1.copy()
    opt1.step(p1, np.asarray(GRADS[2]))
    opt2.step(p2, np.asarray(GRADS[2]))
    assert np.array_equal(p1, p2)


def test_lbfgs_minimises_an_ill_conditioned_quadratic():
    rng = np.random.default_rng(0)
    Q = rng.normal(size=(20, 20))
    A = Q @ Q.T + np.diag(np.logspace(-2, 2, 20))
    b = rng.normal(size=20)
    x_star = np.linalg.solve(A, b)

    def fg(x):
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    opt = LBFGS(history=10, lr=1.0, gtol=1e-10)
    x = np.zeros(20)
    f, g = fg(x)
    for _ in range(300):
        f, g = opt.iterate(fg, x, f, g)
        if opt.converged:
            break
    assert np.linalg.norm(x - x_star) / np.linalg.norm(x_star) < 1e-6
    assert opt.evals < 300


def test_the_registry_builds_every_optimizer_and_says_which_loop():
    for name in ("sgd", "momentum", "adam", "lbfgs"):
        opt = make_optimizer(OptimConfig(name=name), 3)
        assert opt.full_batch_line_search is (name == "lbfgs")
        assert optimizer_class(name).full_batch_line_search is opt.full_batch_line_search
    assert set(OPTIMIZERS) == {"sgd", "momentum", "adam", "lbfgs"}
    opt = make_optimizer(OptimConfig(name="lbfgs", lr=0.5, history=4), 20)
    assert isinstance(opt, LBFGS) and opt.history == 4 and opt.first_step == 0.5


def test_lbfgs_from_the_registry_minimises_and_resumes_identically():
    rng = np.random.default_rng(1)
    Q = rng.normal(size=(8, 8))
    A = Q @ Q.T + np.eye(8)
    b = rng.normal(size=8)

    def fg(x):
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    cfg = OptimConfig(name="lbfgs", lr=1.0, history=5)
    opt, x = make_optimizer(cfg, 8), np.zeros(8)
    f, g = fg(x)
    for _ in range(3):
        f, g = opt.iterate(fg, x, f, g)
    again = make_optimizer(cfg, 8)  # a resumed run: a fresh optimiser loads the saved state
    again.load_state({k: np.copy(v) for k, v in opt.state().items()})
    y = x.copy()
    f1, _ = opt.iterate(fg, x, f, g)
    f2, _ = again.iterate(fg, y, f, g)
    assert f1 == f2 and np.array_equal(x, y)
    while not opt.converged and opt.evals < 200:
        f, g = opt.iterate(fg, x, *fg(x))
    assert np.allclose(x, np.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


def _numpy_updates(name, p, grads, lr=0.01, mu=0.9, b1=0.9, b2=0.999, eps=1e-8):
    """The NumPy expressions the fused passes replace (the state of the art before them)."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            p -= lr * g
        elif name == "momentum":
            v *= mu
            v += g
            p -= lr * v
        else:
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * g * g
            p -= lr * (m / (1.0 - b1**t)) / (np.sqrt(v / (1.0 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("n", [5, (1 << 15) - 1, 1 << 15, 100_003])
def test_fused_updates_are_the_numpy_bits(name, n):
    """On the calling thread (small models) and on the rank's threads (from PARALLEL_MIN
    parameters): the bits of the NumPy expressions either way."""
    from lepton_hpc.optim import updates

    assert updates.PARALLEL_MIN == 1 << 15
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)
    grads = [rng.standard_normal(n) * 10.0 ** rng.integers(-8, 4, n) for _ in range(4)]
    opt = make_optimizer(OptimConfig(name=name, lr=0.01, momentum=0.9), n)
    p = p0.copy()
    for g in grads:
        opt.step(p, g)
    assert np.array_equal(p, _numpy_updates(name, p0.copy(), grads))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("n", [7, 100_003])
def test_updates_from_summed_gradients_are_the_bits_of_the_mean_then_the_update(name, n):
    """``step_sums``: the mean (and L2 term) folded into the pass gives the bits of NumPy's
    ``sums / rows + l2 * params`` followed by the update, and ``step`` those of rows = 1."""
    rng = np.random.default_rng(n + 1)
    p0 = rng.standard_normal(n)
    sums = [rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, n) for _ in range(3)]
    rows = [3.0, 1.0, 4097.0]
    l2 = np.where(rng.random(n) < 0.7, 1e-3, 0.0)
    for mask in (l2, np.zeros(0)):
        fused = make_optimizer(OptimConfig(name=name, lr=0.01, momentum=0.9), n)
        plain = make_optimizer(OptimConfig(name=name, lr=0.01, momentum=0.9), n)
        p, q = p0.copy(), p0.copy()
        for s, r in zip(sums, rows, strict=True):
            fused.step_sums(p, s, r, mask)
            grad = s / r
            if mask.size:
                grad += mask * q
            plain.step(q, grad)
        assert np.array_equal(p, q) and not np.array_equal(p, p0)
        assert fused.t == plain.t == 3


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("n", [9, 1 << 15])
def test_sums_over_a_power_of_two_rows_keep_the_bits_of_the_division(name, n):
    """Rows a power of two: the passes multiply by the exact reciprocal instead of dividing;
    every bit stays that of NumPy's ``sums / rows`` then the update, subnormal, huge, signed
    zero, infinite and NaN sums included, and rows whose reciprocal would not be normal."""
    rng = np.random.default_rng(n + 2)
    p0 = rng.standard_normal(n)
    edge = np.array([5e-324, -5e-324, 1e-310, -3e-308, 1.7e308, -1.7e308, 0.0, -0.0, np.inf])
    for rows in (256.0, 4096.0, 0.5, 2.0, 2.0**-1019, 2.0**1019, 2.0**1023, 3.0, 1.0, 6.0):
        sums = rng.standard_normal(n) * 10.0 ** rng.integers(-320, 300, n)
        sums[: edge.size] = edge[: min(n, edge.size)]
        sums[-1] = np.nan
        fused = make_optimizer(OptimConfig(name=name, lr=0.01, momentum=0.9), n)
        plain = make_optimizer(OptimConfig(name=name, lr=0.01, momentum=0.9), n)
        p, q = p0.copy(), p0.copy()
        with np.errstate(all="ignore"):
            for scale in (1.0, -0.5):
                fused.step_sums(p, sums * scale, rows)
                plain.step(q, sums * scale / rows)
        assert np.array_equal(p.view(np.int64), q.view(np.int64)), rows


def test_serial_and_threaded_updates_are_cached_apart():
    """Numba's disk cache keys a kernel by qualified name and signature, not by its options: the
    serial and threaded update of each optimiser need names of their own, or a fresh process
    loads the one compiled first for both."""
    from lepton_hpc.optim import updates

    for serial, threaded in (updates._SGD, updates._MOMENTUM, updates._ADAM):
        assert serial.py_func.__qualname__ != threaded.py_func.__qualname__
        assert not serial.targetoptions.get("parallel")
        assert threaded.targetoptions["parallel"] is True
        assert serial.py_func.__code__ is threaded.py_func.__code__  # one source

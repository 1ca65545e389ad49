"""Optimisers against their textbook update rules, and L-BFGS on problems with a known optimum."""

import numpy as np

from lepton_hpc.config import OptimConfig
from lepton_hpc.optim import make_optimizer
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

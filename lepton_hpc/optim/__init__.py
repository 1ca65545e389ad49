"""Optimisers that update the flat parameter buffer in place, chosen by name from a registry.

Their state is a dict of arrays and counters, saved in checkpoints so a resumed run continues
bit for bit. L-BFGS (full batch, convex models, in ``lbfgs``) is in the same registry; its
``full_batch_line_search`` tells the trainer to drive it with the full-batch loop (an objective
it evaluates several times per iteration) instead of one ``step`` per batch.
"""

from __future__ import annotations

import numpy as np

from . import updates
from .lbfgs import LBFGS


def mean_of_sums(sums: np.ndarray, rows: float, l2: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The mean gradient from the gradient summed over ``rows`` rows, with the L2 term
    ``l2 * params`` where ``l2`` is not empty: the NumPy expressions whose bits every
    optimiser's ``step_sums`` gives."""
    grad = sums / rows
    if l2.size:
        grad += l2 * params
    return grad


class Optimizer:
    """``step(params, grad)`` updates ``params`` in place from the global mean gradient;
    ``step_sums(params, sums, rows, l2)`` from the gradient summed over ``rows`` rows, with
    the L2 term ``l2 * params`` added to the mean where ``l2`` is not empty (the built-in
    optimisers fold both into their one pass: ``updates``)."""

    full_batch_line_search = False

    @classmethod
    def from_config(cls, cfg, n: int) -> Optimizer:
        return cls(n, cfg)

    def __init__(self, n: int, cfg) -> None:  # noqa: ARG002 - n sizes the state of subclasses
        self.lr = float(cfg.lr)  # floats: the update kernels' compiled signature
        self.t = 0

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError

    def step_sums(
        self, params: np.ndarray, sums: np.ndarray, rows: float, l2: np.ndarray = updates.NO_L2
    ) -> None:
        self.step(params, mean_of_sums(sums, rows, l2, params))

    def state(self) -> dict[str, np.ndarray]:
        return {"t": np.array(self.t)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])


class SGD(Optimizer):
    """Plain gradient descent: ``p -= lr * g``. (Each update is one fused pass, ``updates``.)"""

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        self.step_sums(params, grad, 1.0)

    def step_sums(self, params, sums, rows, l2=updates.NO_L2) -> None:
        self.t += 1
        updates.sgd(params, sums, float(rows), l2, self.lr)


class Momentum(Optimizer):
    """Heavy-ball momentum as in PyTorch: ``v = mu * v + g; p -= lr * v``."""

    def __init__(self, n: int, cfg) -> None:
        super().__init__(n, cfg)
        self.mu = float(cfg.momentum)
        self.v = np.zeros(n)

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        self.step_sums(params, grad, 1.0)

    def step_sums(self, params, sums, rows, l2=updates.NO_L2) -> None:
        self.t += 1
        updates.momentum(params, sums, float(rows), l2, self.v, self.mu, self.lr)

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        self.v[...] = state["v"]


class Adam(Optimizer):
    """Adam with bias correction (Kingma and Ba, 2015)."""

    def __init__(self, n: int, cfg) -> None:
        super().__init__(n, cfg)
        self.b1, self.b2, self.eps = float(cfg.beta1), float(cfg.beta2), float(cfg.eps)
        self.m = np.zeros(n)
        self.v = np.zeros(n)

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        self.step_sums(params, grad, 1.0)

    def step_sums(self, params, sums, rows, l2=updates.NO_L2) -> None:
        self.t += 1
        c1, c2 = 1.0 - self.b1**self.t, 1.0 - self.b2**self.t  # the bias corrections
        updates.adam(
            params,
            sums,
            float(rows),
            l2,
            self.m,
            self.v,
            self.b1,
            self.b2,
            c1,
            c2,
            self.lr,
            self.eps,
        )

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), "m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        self.m[...] = state["m"]
        self.v[...] = state["v"]


OPTIMIZERS: dict[str, type[Optimizer] | type[LBFGS]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "adam": Adam,
    "lbfgs": LBFGS,
}


def optimizer_class(name: str) -> type[Optimizer] | type[LBFGS]:
    """The class registered as ``name`` (its ``full_batch_line_search`` says which loop)."""
    return OPTIMIZERS[name]


def make_optimizer(cfg, n: int) -> Optimizer | LBFGS:
    """The optimiser named by ``optim.name`` for ``n`` parameters, L-BFGS included."""
    return OPTIMIZERS[cfg.name].from_config(cfg, n)

"""Distributed L-BFGS for full-batch training of the convex models, the way Spark MLlib does it.

Each evaluation of the objective is one pass over every rank's rows and one allreduce of
[gradient, loss, count]; the two-loop recursion and the line search then run identically on
every rank (they see the same reduced numbers), so no further communication is needed. It is
registered as "lbfgs" in ``lepton_hpc.optim``; ``full_batch_line_search`` makes the trainer run
the full-batch loop, where an iteration is an epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


class LBFGS:
    """Limited-memory BFGS with a backtracking (Armijo) line search; state is checkpointable."""

    full_batch_line_search = True

    @classmethod
    def from_config(cls, cfg, n: int) -> LBFGS:  # noqa: ARG003 - the state does not depend on n
        """From ``[optim]``: ``history`` pairs kept, ``lr`` the first trial step."""
        return cls(cfg.history, cfg.lr)

    def __init__(
        self, history: int = 10, lr: float = 1.0, gtol: float = 1e-8, ftol: float = 1e-14
    ) -> None:
        self.history = history
        self.first_step = lr
        self.gtol, self.ftol = gtol, ftol
        self.pairs: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=history)
        self.evals = 0
        self.converged = False

    def direction(self, g: np.ndarray) -> np.ndarray:
        """The two-loop recursion: ``-H g`` with the implicit inverse-Hessian estimate H."""
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(self.pairs):
            a = rho * (s @ q)
            q -= a * y
            alphas.append(a)
        if self.pairs:
            s, y, _ = self.pairs[-1]
            q *= (s @ y) / (y @ y)
        for (s, y, rho), a in zip(self.pairs, reversed(alphas), strict=True):
            b = rho * (y @ q)
            q += (a - b) * s
        return -q

    def iterate(
        self, fg: Objective, x: np.ndarray, f: float, g: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """One L-BFGS iteration from (x, f, g); updates ``x`` in place, returns the new (f, g)."""
        d = self.direction(g)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            self.pairs.clear()
            d, slope = -g, -float(g @ g)
        step = 1.0 if self.pairs else min(1.0, self.first_step / max(np.abs(g).max(), 1e-300))
        x0 = x.copy()
        for _ in range(40):
            x[...] = x0 + step * d
            f_new, g_new = fg(x)
            self.evals += 1
            if np.isfinite(f_new) and f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            x[...] = x0
            self.converged = True
            return f, g
        s, y = x - x0, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y):
            self.pairs.append((s, y, 1.0 / sy))
        if np.abs(g_new).max() <= self.gtol or abs(f - f_new) <= self.ftol * max(
            abs(f), abs(f_new), 1.0
        ):
            self.converged = True
        return f_new, g_new

    def state(self) -> dict[str, np.ndarray]:
        pairs = list(self.pairs)
        out = {"evals": np.array(self.evals), "converged": np.array(int(self.converged))}
        if pairs:
            out["s"] = np.stack([p[0] for p in pairs])
            out["y"] = np.stack([p[1] for p in pairs])
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.evals = int(state["evals"])
        self.converged = bool(int(state["converged"]))
        self.pairs.clear()
        if "s" in state:
            for s, y in zip(state["s"], state["y"], strict=True):
                self.pairs.append((s.copy(), y.copy(), 1.0 / float(s @ y)))

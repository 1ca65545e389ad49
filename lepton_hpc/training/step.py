"""What one training step needs, and the fused buffer every reduction sums.

A step computes the gradient of the rows of the global batch that live on this rank with one
fused kernel pass and reduces ONE float64 buffer, laid out as

    [payload (n) | loss sum | rows | stop flag | step]

The payload is the gradient sums (sync, overlap, L-BFGS) or the row-weighted parameter and
optimiser-state differences (local SGD). The rows make the mean exact whatever the split, the
flag lets every rank see a signal at the same step, and the step slot (each rank's counter,
summed) catches ranks that went out of step. ``StepContext`` owns that layout: it fills the
stop and step slots, reads them back, and turns reduced sums into the mean gradient plus L2.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..comm.base import Communicator
from ..compile_clock import compile_clock
from ..device import Device
from ..faults import FaultHooks, StopFlag
from ..optim import mean_of_sums
from ..optim.updates import NO_L2

TAIL = 4  # loss sum, rows, stop flag, step: the slots after the payload


class Timers:
    """Seconds spent per kind of work (io, compute, comm), summed over the run.

    ``with timers("compute"):`` times a block; a plain class, not a generator context manager,
    because it runs several times per training step. Time Numba spent compiling kernels inside
    a block (a cold cache: the first run after an install without ``lepton warmup``) is not
    work of that kind: it goes to ``seconds["compile"]`` (once, for nested blocks) instead.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[tuple[str, float, float]] = []
        self._clock = compile_clock()

    def __call__(self, name: str) -> Timers:
        clock = self._clock  # ``clock.now()`` without the call while nothing compiles
        c0 = clock.now() if clock.depth else clock.seconds
        self._open.append((name, time.perf_counter(), c0))
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        t1 = time.perf_counter()
        name, t0, c0 = self._open.pop()
        clock = self._clock
        compiled = (clock.now() if clock.depth else clock.seconds) - c0
        if compiled:
            self.seconds[name] += t1 - t0 - compiled
            if not self._open:
                self.seconds["compile"] += compiled
        else:
            self.seconds[name] += t1 - t0


@dataclass(slots=True)
class StepOutcome:
    """What a reduction told every rank: global loss sum, rows, and whether to stop."""

    loss_sum: float = 0.0
    rows: float = 0.0
    stop: bool = False

    def __add__(self, other: StepOutcome) -> StepOutcome:
        return StepOutcome(
            self.loss_sum + other.loss_sum, self.rows + other.rows, self.stop or other.stop
        )


def check_step(reported: float, step: int, size: int) -> None:
    """Every rank put its step counter in the buffer: their sum must be ``step * size``."""
    if reported != float(step) * size:
        raise RuntimeError(
            f"ranks are out of step: step {step} here, mean {reported / size:g} over ranks"
        )


def fused_buffer(n: int) -> np.ndarray:
    """A zeroed buffer for a payload of ``n`` values: [payload | loss | rows | stop | step]."""
    return np.zeros(n + TAIL)


def kernel_part(buf: np.ndarray) -> np.ndarray:
    """The part a gradient kernel fills: [payload, loss sum, rows]."""
    return buf[: buf.size - 2]


@dataclass(slots=True)
class StepContext:
    """Everything a strategy needs for a step, and nothing of the trainer's.

    ``comm``: ranks and collectives; ``backend``: what sums buffers (MPI or Horovod);
    ``reduction``: how the fused buffer is summed (set once built, it calls ``kernel``);
    ``device``: the kernel backend; ``sizes``/``act``/``head``: the model for the kernels;
    ``l2_mask``: the L2 coefficient of each parameter (0 for biases).
    """

    comm: Communicator
    backend: Any
    device: Device
    sizes: np.ndarray
    act: int
    head: int
    l2_mask: np.ndarray
    timers: Timers
    stop: StopFlag
    hooks: FaultHooks
    reduction: Any = None
    l2_any: bool = field(init=False)
    buf: np.ndarray = field(init=False)  # the sync step's fused buffer, reused every step
    slow: float = field(init=False)  # LEPTON_FAULT slow=F@RANK: this rank's factor (1.0: off)

    def __post_init__(self) -> None:
        self.l2_mask = np.ascontiguousarray(self.l2_mask, dtype=np.float64)  # the update's type
        self.l2_any = bool(self.l2_mask.any())
        self.buf = fused_buffer(self.n_params)
        factor = getattr(self.hooks, "slow_factor", None)
        self.slow = factor(self.comm.rank) if factor is not None else 1.0

    @property
    def n_params(self) -> int:
        return self.l2_mask.size

    def kernel(self, X, y, params: np.ndarray, out: np.ndarray) -> None:
        """Summed loss gradient, loss and row count of the rows of X into ``out``.

        Under ``LEPTON_FAULT`` ``slow=F@RANK`` this rank then sleeps (F - 1) times the call's
        seconds (inside the caller's timed compute): a node F times slower."""
        if self.slow == 1.0:
            self.device.gradient(X, y, params, self.sizes, self.act, self.head, out)
            return
        t0 = time.perf_counter()
        self.device.gradient(X, y, params, self.sizes, self.act, self.head, out)
        time.sleep((self.slow - 1.0) * (time.perf_counter() - t0))

    def mark(self, buf: np.ndarray, step: int) -> None:
        """Stop flag and step counter in the last two slots (fault hooks may alter the step)."""
        buf[-2] = 1.0 if self.stop.requested else 0.0
        buf[-1] = float(self.hooks.before_step(self.comm.rank, step))

    def outcome(self, buf: np.ndarray, step: int) -> StepOutcome:
        """Read a reduced buffer's tail: checks the step slot, returns loss, rows and stop."""
        loss, rows, stop, reported = buf[-TAIL:].tolist()  # Python floats: cheap to use below
        check_step(reported, step, self.comm.size)
        return StepOutcome(loss, rows, stop > 0)

    def mean_gradient(self, sums: np.ndarray, rows: float, params: np.ndarray) -> np.ndarray:
        """The global mean gradient from summed gradients: ``sums / rows + l2_mask * params``."""
        return mean_of_sums(sums, max(rows, 1.0), self._l2(), params)

    def update(self, opt, params: np.ndarray, sums: np.ndarray, rows: float) -> None:
        """``opt``'s update from summed gradients: the bits of ``opt.step(params,
        self.mean_gradient(sums, rows, params))``, the mean folded into the optimiser's pass."""
        opt.step_sums(params, sums, max(rows, 1.0), self._l2())

    def _l2(self) -> np.ndarray:
        """The L2 coefficients the mean adds, or none (an empty array) where all are 0."""
        return self.l2_mask if self.l2_any else NO_L2

    def summed_gradient(
        self, params: np.ndarray, X, y, step: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, StepOutcome]:
        """The batch's gradient summed over every rank's rows (a view of the fused buffer,
        valid until the next step) via one fused allreduce.

        ``rows``: the local row positions of X (None: all local rows), for block-ordered sums.
        """
        buf = self.buf
        with self.timers("compute"):
            self.reduction.local_sums(params, X, y, kernel_part(buf), rows)
        self.mark(buf, step)
        with self.timers("comm"):
            self.reduction.reduce_(buf)
        return buf[: self.n_params], self.outcome(buf, step)

    def gradient(
        self, params: np.ndarray, X, y, step: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, StepOutcome]:
        """Global mean gradient of the batch (with L2): ``summed_gradient``'s mean."""
        sums, out = self.summed_gradient(params, X, y, step, rows)
        return self.mean_gradient(sums, out.rows, params), out

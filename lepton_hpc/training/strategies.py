"""How ranks combine their work into updates: strategies chosen by ``comm.strategy``.

Every strategy reduces ONE fused float64 buffer per exchange, [payload, loss sum, rows, stop
flag, step], whose layout ``step.StepContext`` owns. Strategies take that context and the
optimiser, never the trainer, and return what each step did (loss sum, rows, stop) as a
``StepOutcome``.

- ``sync`` (default): the global mean gradient every step, then the same update on every rank.
  The reference: the result is the full-batch (or global mini-batch) gradient method.
- ``local_sgd``: each rank takes ``comm.local_steps`` (K) optimiser steps on its own rows of
  each global batch, then ONE reduction of [(params - anchor) * w, (state - anchor) * w, ...]
  averages parameters and optimiser state weighted by w, the rows each rank used (federated
  averaging with data-size weights). K times fewer collectives; each local step sees p times
  fewer rows, so it is noisier, and ranks drift apart between averages. Signals are seen at the
  next average (at most K steps later). For latency-bound links or many small steps.
- ``overlap``: step t's gradient is reduced by a non-blocking allreduce while step t+1's
  gradient is computed; the update made at step t+1 uses step t's gradient (staleness 1: each
  gradient is evaluated at parameters one update older than those it is applied to; the L2 term
  uses the current ones). Hides the allreduce behind the compute where MPI progresses in the
  background (Horovod's thread always does); at checkpoints, epoch ends and stops the pipeline is
  drained so every saved state is complete and resumes bit for bit.

Reproducible mode (``comm.reproducible = true``, sync only): the training rows are cut into
global blocks of the file's rows (``data.reader.global_block_rows``: 1024 rows, fewer for files
under 64K rows) that never depend on the rank count; the reader gives each rank whole blocks, the
kernel sums each block's rows of the batch separately in float64 (rows in the batch's own order),
every rank allgathers the (block id, partial sums) pairs and adds them in global block order.
The same additions happen in the same order for 1, 2, 3, ... ranks, so the parameters are
bitwise identical. Its cost against the default mode: one kernel call per block present in the
batch instead of one per rank (less thread parallelism per call and a Python loop), an allgather
of n_blocks x (P + 2) float64 instead of an allreduce of P + 4, and an O(n_blocks x P) ordered sum
on every rank. Full batch: close to the default (tens of blocks per rank); small mini-batches
touch nearly every block each step and cost much more (docs/performance.md, "Communication").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..comm.compression import make_reducer
from ..data.reader import global_block_rows
from ..errors import ConfigError
from ..optim import optimizer_class
from .step import StepContext, StepOutcome, check_step, fused_buffer, kernel_part

__all__ = [
    "STRATEGIES",
    "BlockOrderedReduction",
    "FusedReduction",
    "LocalSGD",
    "Overlap",
    "StepOutcome",
    "Strategy",
    "Sync",
    "check_comm_config",
    "check_step",
    "make_reduction",
    "make_strategy",
]


def check_comm_config(cfg) -> None:
    """Combinations of [comm] with [optim] that have no meaning are errors naming the key."""
    c = cfg.comm
    if c.reproducible and c.strategy != "sync":
        raise ConfigError(
            "comm.reproducible",
            f'needs comm.strategy = "sync" (not {c.strategy!r}): local steps and stale '
            "gradients depend on how rows are split between ranks",
        )
    if c.reproducible and c.compression != "none":
        raise ConfigError(
            "comm.reproducible",
            'needs comm.compression = "none": per-rank error feedback depends on the rank count',
        )
    name = cfg.optim.name
    if optimizer_class(name).full_batch_line_search:
        if c.strategy != "sync":
            raise ConfigError(
                "comm.strategy", f'{name} needs "sync" (a line search needs exact steps)'
            )
        if c.compression != "none":
            raise ConfigError("comm.compression", f'{name} needs "none" (exact gradients)')


class _Done:
    def Wait(self) -> None:  # noqa: N802 - the name mpi4py's requests have
        return None


# ---- reductions of the fused buffer: how [grad, loss, rows] is summed over ranks -------------
class FusedReduction:
    """The default: one kernel pass over the rank's rows, one allreduce of the fused buffer."""

    def __init__(self, kernel, reducer: Any) -> None:
        self.kernel, self.reducer = kernel, reducer

    def arrange(self, rows: np.ndarray) -> np.ndarray:
        """The batch's local rows in the order the kernel should see them."""
        return rows

    def local_sums(self, params, X, y, out: np.ndarray, rows=None) -> None:  # noqa: ARG002
        self.kernel(X, y, params, out)

    def reduce_(self, buf: np.ndarray) -> None:
        self.reducer.allreduce_(buf)

    def ireduce_(self, buf: np.ndarray) -> Any:
        start = getattr(self.reducer, "iallreduce_", None)
        if start is None:  # a size-1 communicator: nothing to wait for
            self.reducer.allreduce_(buf)
            return _Done()
        return start(buf)

    def reset(self) -> None:
        """Drop per-rank compression residuals (at points where the state is saved)."""
        if hasattr(self.reducer, "reset"):
            self.reducer.reset()


class BlockOrderedReduction(FusedReduction):
    """Reproducible mode: per-block partial sums, allgathered and added in global block order."""

    def __init__(self, kernel, comm, file_rows: np.ndarray, block_rows: int) -> None:
        super().__init__(kernel, comm)
        self.comm = comm
        self.block = file_rows // block_rows  # block of each local training row, ascending
        self._ids = np.zeros(0, dtype=np.int64)
        self._parts = np.zeros((0, 0))

    def arrange(self, rows: np.ndarray) -> np.ndarray:
        # A block's rows become contiguous, each block keeping the batch's (global) row order.
        return rows[np.argsort(self.block[rows], kind="stable")]

    def local_sums(self, params, X, y, out: np.ndarray, rows=None) -> None:
        ids = self.block if rows is None else self.block[rows]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else ids[:0]
        stops = np.r_[starts[1:], ids.size][: starts.size]
        parts = np.empty((starts.size, out.size))
        for k, (a, b) in enumerate(zip(starts, stops, strict=True)):
            self.kernel(X[a:b], y[a:b], params, parts[k])
        self._ids, self._parts = ids[starts], parts

    def reduce_(self, buf: np.ndarray) -> None:
        n = buf.size - 2  # [grad, loss, rows] are summed by block; [flag, step] by rank
        gathered = self.comm.allgather((self._ids, self._parts, buf[n:].copy()))
        ids = np.concatenate([g[0] for g in gathered])
        parts = np.concatenate([g[1].reshape(-1, n) for g in gathered])
        total = np.zeros(n)
        for k in np.argsort(ids, kind="stable"):  # global block order, one block at a time
            total += parts[k]
        tail = np.zeros(buf.size - n)
        for g in gathered:  # stop flags and step counters: small integers, exact in any order
            tail += g[2]
        buf[:n] = total
        buf[n:] = tail

    def ireduce_(self, buf: np.ndarray) -> Any:  # pragma: no cover - rejected by the config check
        raise NotImplementedError("reproducible mode is sync only")


def make_reduction(
    comm_cfg, ctx: StepContext, file_rows: np.ndarray, n_file_rows: int
) -> FusedReduction:
    """The reduction for ``comm_cfg`` (compression wraps the backend's allreduce).

    ``file_rows``: the file row of each local training row; ``n_file_rows``: rows in the file
    (reproducible mode cuts them into global blocks).
    """
    if comm_cfg.reproducible:
        block_rows = global_block_rows(n_file_rows)
        return BlockOrderedReduction(ctx.kernel, ctx.comm, file_rows, block_rows)
    reducer = make_reducer(comm_cfg.compression, ctx.backend, ctx.n_params)
    return FusedReduction(ctx.kernel, reducer)


# ---- strategies: how reduced sums become parameter updates ------------------------------------
class Strategy:
    """``step`` takes one batch and updates ``params``; ``settle`` brings every rank to the same
    complete state (called before checkpoints, stops and epoch ends). The base class is sync.

    Both return the ``StepOutcome`` of the reductions they completed (none: an empty one)."""

    name = "sync"

    def __init__(self, ctx: StepContext, opt, params: np.ndarray) -> None:  # noqa: ARG002
        self.ctx, self.opt = ctx, opt
        self.P = ctx.n_params

    def step(self, params: np.ndarray, X, y, step: int, rows: np.ndarray) -> StepOutcome:
        grad, out = self.ctx.gradient(params, X, y, step, rows)
        self.opt.step(params, grad)
        return out

    def settle(self, params: np.ndarray, step: int) -> StepOutcome:  # noqa: ARG002
        self.ctx.reduction.reset()
        return StepOutcome()


Sync = Strategy


class Overlap(Strategy):
    """Non-blocking allreduce of step t's buffer while step t+1 computes; staleness 1."""

    name = "overlap"

    def __init__(self, ctx: StepContext, opt, params: np.ndarray) -> None:
        super().__init__(ctx, opt, params)
        self.bufs = [fused_buffer(self.P), fused_buffer(self.P)]  # double buffer
        self.turn = 0
        self.pending: tuple[Any, np.ndarray, int] | None = None

    def step(self, params: np.ndarray, X, y, step: int, rows: np.ndarray) -> StepOutcome:
        ctx = self.ctx
        buf = self.bufs[self.turn]
        self.turn ^= 1
        with ctx.timers("compute"):
            ctx.reduction.local_sums(params, X, y, kernel_part(buf), rows)
        ctx.mark(buf, step)
        with ctx.timers("comm"):
            request = ctx.reduction.ireduce_(buf)
        out = self._apply_pending(params)
        self.pending = (request, buf, step)
        return out

    def _apply_pending(self, params: np.ndarray) -> StepOutcome:
        """Wait for the buffer in flight and update ``params`` with its (one step old) gradient."""
        if self.pending is None:
            return StepOutcome()
        ctx = self.ctx
        request, buf, step = self.pending
        self.pending = None
        with ctx.timers("comm"):
            request.Wait()
        out = ctx.outcome(buf, step)
        self.opt.step(params, ctx.mean_gradient(buf[: self.P], out.rows, params))
        return out

    def settle(self, params: np.ndarray, step: int) -> StepOutcome:
        out = self._apply_pending(params)
        return out + super().settle(params, step)


class LocalSGD(Strategy):
    """K local steps on the rank's own rows, then a row-weighted average of parameters and
    optimiser state in one reduction of [(params - anchor) w, (state - anchor) w, loss, w, flag,
    step] (differences from the last average: compression then quantises small numbers)."""

    name = "local_sgd"

    def __init__(
        self, ctx: StepContext, opt, params: np.ndarray, *, local_steps: int, compression: str
    ) -> None:
        super().__init__(ctx, opt, params)
        self.K = local_steps
        state = opt.state()
        self.keys = list(state)
        self.shapes = [np.shape(state[k]) for k in self.keys]
        self.integer = [np.asarray(state[k]).dtype.kind in "iub" for k in self.keys]
        self.S = sum(int(np.prod(s)) for s in self.shapes)
        self.local = kernel_part(fused_buffer(self.P))
        self.buf = fused_buffer(self.P + self.S)
        self.reducer = make_reducer(compression, ctx.backend, self.P + self.S)
        self._new_round(params)

    def _flat_state(self) -> np.ndarray:
        state = self.opt.state()
        return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in self.keys])

    def _new_round(self, params: np.ndarray) -> None:
        self.anchor_params = params.copy()
        self.anchor_state = self._flat_state()
        self.steps, self.rows, self.loss, self.last_step = 0, 0.0, 0.0, 0

    def step(self, params: np.ndarray, X, y, step: int, rows: np.ndarray) -> StepOutcome:
        ctx, P = self.ctx, self.P
        with ctx.timers("compute"):
            ctx.reduction.local_sums(params, X, y, self.local, rows)
        n = self.local[P + 1]
        if n > 0:  # a rank with none of this batch's rows keeps its parameters
            self.opt.step(params, ctx.mean_gradient(self.local[:P], n, params))
        self.rows += n
        self.loss += self.local[P]
        self.steps += 1
        self.last_step = step
        if self.steps >= self.K:
            return self._average(params)
        ctx.hooks.before_step(ctx.comm.rank, step)  # delays and injected errors still apply
        return StepOutcome()

    def _average(self, params: np.ndarray) -> StepOutcome:
        ctx, P, S, b = self.ctx, self.P, self.S, self.buf
        b[:P] = (params - self.anchor_params) * self.rows
        b[P : P + S] = (self._flat_state() - self.anchor_state) * self.rows
        b[P + S] = self.loss
        b[P + S + 1] = self.rows
        ctx.mark(b, self.last_step)
        with ctx.timers("comm"):
            self.reducer.allreduce_(b)
        out = ctx.outcome(b, self.last_step)
        if out.rows > 0:
            params[...] = self.anchor_params + b[:P] / out.rows
            flat = self.anchor_state + b[P : P + S] / out.rows
            self.opt.load_state(self._unflatten(flat))
        self._new_round(params)
        return out

    def _unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        state, at = {}, 0
        for key, shape, integer in zip(self.keys, self.shapes, self.integer, strict=True):
            size = int(np.prod(shape))
            value = flat[at : at + size].reshape(shape)
            state[key] = np.rint(value).astype(np.int64) if integer else value
            at += size
        return state

    def settle(self, params: np.ndarray, step: int) -> StepOutcome:
        out = self._average(params) if self.steps else StepOutcome()
        if hasattr(self.reducer, "reset"):
            self.reducer.reset()
        return out + super().settle(params, step)


STRATEGIES: dict[str, type[Strategy]] = {"sync": Sync, "local_sgd": LocalSGD, "overlap": Overlap}


def make_strategy(comm_cfg, ctx: StepContext, opt, params: np.ndarray) -> Strategy:
    """The strategy named by ``comm_cfg.strategy`` for this context and optimiser; ``params``:
    the parameters training starts from (local SGD's first anchor)."""
    if comm_cfg.strategy == "local_sgd":
        return LocalSGD(
            ctx, opt, params, local_steps=comm_cfg.local_steps, compression=comm_cfg.compression
        )
    return STRATEGIES[comm_cfg.strategy](ctx, opt, params)

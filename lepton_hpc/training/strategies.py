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
- ``fedavg``: federated averaging. Each rank is a client holding its own data file (its rows are
  its alone: batches, shuffles and epochs are per client). Rounds of ``comm.local_epochs``
  epochs: at a round's start the clients ``sample_clients(seed, round)`` names (the same set on
  every rank, ``comm.client_fraction`` of them, at least one) take the global model; each trains
  alone, with a fresh optimiser state (reset every round: nothing of a client's optimiser
  outlives its round, so checkpoints hold only the global model and resume exactly), and with
  ``comm.prox_mu`` > 0 the FedProx gradient mu (w - w_global). At the round's end ONE
  allreduce of [rows * params, rows, loss, rows seen, flag, round] gives the row-weighted
  average of the sampled clients' parameters; a client not sampled writes zeros, so it weighs
  exactly nothing, whatever its data. Checkpoints, metrics and stops come between rounds only.

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
    "FedAvg",
    "FusedReduction",
    "LocalSGD",
    "Overlap",
    "StepOutcome",
    "Strategy",
    "Sync",
    "check_comm_config",
    "check_step",
    "client_files",
    "make_reduction",
    "make_strategy",
    "sample_clients",
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
    if c.strategy == "fedavg":
        if c.compression != "none":
            raise ConfigError("comm.compression", 'fedavg needs "none" (one exact average a round)')
        if cfg.train.max_steps:
            raise ConfigError(
                "train.max_steps", "fedavg counts rounds of comm.local_epochs epochs: set 0"
            )
        if cfg.checkpoint.every_steps:
            raise ConfigError(
                "checkpoint.every_steps", "fedavg checkpoints between rounds only: set 0"
            )
    if c.strategy == "async":
        why = 'with comm.strategy = "async"'
        if c.compression != "none":
            raise ConfigError("comm.compression", f'must be "none" {why} (updates are exact)')
        if c.backend != "mpi":
            raise ConfigError(
                "comm.backend", f'must be "mpi" {why} (the shared model is an MPI window)'
            )
        if cfg.checkpoint.every_steps:
            raise ConfigError(
                "checkpoint.every_steps", f"{why} checkpoints come between epochs only: set 0"
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

    in_place = True
    """The kernel gets the batch as it is: a ``TakenBatch`` (rows read where they are) will do."""

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

    in_place = False  # slices the batch's rows block by block

    def __init__(self, kernel, comm, file_rows: np.ndarray, block_rows: int, blocks=None) -> None:
        super().__init__(kernel, comm)
        self.comm = comm
        # block of each local training row, ascending (``blocks``: already computed)
        self.block = file_rows // block_rows if blocks is None else blocks
        self._ids = np.zeros(0, dtype=np.int64)
        self._parts = np.zeros((0, 0))

    def set_blocks(self, blocks: np.ndarray) -> None:
        """The global block of each local training row, after the rows were re-partitioned
        (``data.balance``)."""
        self.block = blocks

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
    comm_cfg, ctx: StepContext, file_rows: np.ndarray, n_file_rows: int, blocks=None
) -> FusedReduction:
    """The reduction for ``comm_cfg`` (compression wraps the backend's allreduce).

    ``file_rows``: the file row of each local training row; ``n_file_rows``: rows in the file
    (reproducible mode cuts them into global blocks); ``blocks``: or the global block of each
    local training row, already computed (``dataset.Split.blocks``).
    """
    if comm_cfg.reproducible:
        block_rows = global_block_rows(n_file_rows)
        return BlockOrderedReduction(ctx.kernel, ctx.comm, file_rows, block_rows, blocks)
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
        sums, out = self.ctx.summed_gradient(params, X, y, step, rows)
        self.ctx.update(self.opt, params, sums, out.rows)
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
        ctx.update(self.opt, params, buf[: self.P], out.rows)
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
            ctx.update(self.opt, params, self.local[:P], n)
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


CLIENT_STREAM = 0x5EED_FEDA  # keeps the client draw apart from other uses of train.seed


def sample_clients(seed: int, round_: int, clients: int, fraction: float) -> np.ndarray:
    """The clients (ascending rank numbers) that train in round ``round_``: round(fraction x
    clients) of them, at least one, drawn without replacement from (seed, round) only, so every
    rank computes the same set without talking, and a resumed run draws what the first did."""
    m = min(clients, max(1, round(fraction * clients)))
    rng = np.random.default_rng([int(seed), int(round_), CLIENT_STREAM])
    return np.sort(rng.choice(clients, size=m, replace=False))


def client_files(spec, size: int) -> list[str]:
    """The data file of each client (rank) under fedavg: a path holding "{rank}" filled in per
    rank, or a list of exactly one file per rank. A list means clients here, not shards."""
    if isinstance(spec, str):
        if "{rank}" in spec:
            return [spec.replace("{rank}", str(r)) for r in range(size)]
        if size == 1:
            return [spec]
        raise ConfigError(
            "data.train",
            f'{spec!r}: fedavg needs one file per client: a path holding "{{rank}}" '
            '("clients/client-{rank}.h5") or a list of one file per rank',
        )
    if len(spec) != size:
        raise ConfigError(
            "data.train",
            f"lists {len(spec)} files for {size} ranks: under fedavg each rank is a client "
            "reading one file of the list (run one rank per file)",
        )
    return list(spec)


class FedAvg(Strategy):
    """Federated averaging (optionally FedProx) over rounds of local epochs; see the module notes.

    The loop calls ``begin_epoch`` before each epoch's batches and ``settle`` after its last;
    ``settle`` aggregates at a round's last epoch (``round_done``). ``global_step``: client steps
    summed over every sampled client since the start, the same on every rank after a round.
    """

    name = "fedavg"
    federated = True

    def __init__(
        self,
        ctx: StepContext,
        opt,
        params: np.ndarray,
        *,
        local_epochs: int,
        fraction: float,
        prox_mu: float,
        seed: int,
        rows: int,
        epochs: int,
    ) -> None:
        super().__init__(ctx, opt, params)
        self.E, self.fraction, self.mu, self.seed = local_epochs, fraction, prox_mu, seed
        self.weight = float(rows)  # this client's training rows: its weight when sampled
        self.epochs = epochs
        self.fresh = {k: np.array(v, copy=True) for k, v in opt.state().items()}
        self.local = kernel_part(fused_buffer(self.P))
        # [rows * params, rows, steps | loss, rows seen, stop flag, round]
        self.buf = fused_buffer(self.P + 2)
        self.reducer = make_reducer("none", ctx.backend, self.P + 2)
        self.anchor = params.copy()
        self.round, self.epoch, self.active = 0, 0, True
        self.sampled = np.arange(ctx.comm.size)
        self.loss = self.seen = 0.0
        self.steps = 0
        self.global_step = 0
        self.round_done = False

    def reset_optimizer(self) -> None:
        self.opt.load_state({k: v.copy() for k, v in self.fresh.items()})

    def begin_epoch(self, params: np.ndarray, epoch: int, step: int) -> None:
        """At a round's first epoch: draw the round's clients, take the global model as anchor
        (every rank holds it: the last aggregate, or the start), reset the optimiser."""
        self.epoch, self.round = epoch, epoch // self.E
        self.round_done = (epoch + 1) % self.E == 0 or epoch + 1 == self.epochs
        self.sampled = sample_clients(self.seed, self.round, self.ctx.comm.size, self.fraction)
        self.active = bool(np.any(self.sampled == self.ctx.comm.rank))
        if epoch % self.E:
            return
        self.anchor = params.copy()  # the global model: every rank holds the same
        self.reset_optimizer()
        self.loss = self.seen = 0.0
        self.steps = 0
        self.global_step = step

    def step(self, params: np.ndarray, X, y, step: int, rows: np.ndarray) -> StepOutcome:
        ctx, P = self.ctx, self.P
        ctx.hooks.before_step(ctx.comm.rank, step)  # delays and injected errors still apply
        if not self.active:  # not drawn: the client sits out until the next average
            return StepOutcome()
        with ctx.timers("compute"):
            ctx.reduction.local_sums(params, X, y, self.local, rows)
        n = self.local[P + 1]
        if n > 0:
            grad = ctx.mean_gradient(self.local[:P], n, params)
            if self.mu:  # FedProx: the gradient of mu/2 |w - w_global|^2
                grad += self.mu * (params - self.anchor)
            self.opt.step(params, grad)
        self.loss += self.local[P]
        self.seen += n
        self.steps += 1
        return StepOutcome()

    def settle(self, params: np.ndarray, step: int) -> StepOutcome:  # noqa: ARG002
        if not self.round_done:
            return StepOutcome()
        return self.aggregate(params)

    def aggregate(self, params: np.ndarray) -> StepOutcome:
        """The row-weighted mean of the sampled clients' parameters, on every rank."""
        ctx, P, b = self.ctx, self.P, self.buf
        if self.active:
            b[:P] = params * self.weight
            b[P], b[P + 1] = self.weight, self.steps
            b[P + 2], b[P + 3] = self.loss, self.seen
        else:  # exactly zero: nothing of this client's parameters or data enters the sum
            b[: P + 4] = 0.0
        b[-2] = 1.0 if ctx.stop.requested else 0.0  # a signal stops every rank after the round
        b[-1] = float(self.round)  # (fault hooks act on the local steps, not here)
        with ctx.timers("comm"):
            self.reducer.allreduce_(b)
        out = ctx.outcome(b, self.round)
        params[...] = b[:P] / b[P]
        self.global_step += int(b[P + 1])
        self.anchor = params.copy()
        self.reset_optimizer()
        return out


# The strategies built from the step context alone (fedavg also needs its client's rows and the
# run's epochs: ``make_strategy`` builds it).
STRATEGIES: dict[str, type[Strategy]] = {"sync": Sync, "local_sgd": LocalSGD, "overlap": Overlap}


def make_strategy(
    comm_cfg,
    ctx: StepContext,
    opt,
    params: np.ndarray,
    *,
    seed: int = 0,
    rows: int = 0,
    epochs: int = 1,
) -> Strategy:
    """The strategy named by ``comm_cfg.strategy`` for this context and optimiser; ``params``:
    the parameters training starts from (local SGD's first anchor). fedavg also takes the
    seed of its client draw, this client's training rows (its weight) and the run's epochs."""
    if comm_cfg.strategy == "fedavg":
        return FedAvg(
            ctx,
            opt,
            params,
            local_epochs=comm_cfg.local_epochs,
            fraction=comm_cfg.client_fraction,
            prox_mu=comm_cfg.prox_mu,
            seed=seed,
            rows=rows,
            epochs=epochs,
        )
    if comm_cfg.strategy == "local_sgd":
        return LocalSGD(
            ctx, opt, params, local_steps=comm_cfg.local_steps, compression=comm_cfg.compression
        )
    return STRATEGIES[comm_cfg.strategy](ctx, opt, params)

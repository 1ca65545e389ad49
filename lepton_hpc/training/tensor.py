"""Tensor parallelism (``model.parallel = "tensor"``): the rank grid, the slices, the step.

The job's p ranks form a grid of D = p / k data groups x k tensor ranks (k =
``comm.tensor_ranks``): rank r has data index r // k and tensor index r % k. Two ``split``s of
the job's communicator give each rank

- ``tensor``: the k ranks of its data index. They read the same rows and hold complementary
  slices of the MLP (``kernels.tensor``: Megatron-LM's column/row-parallel pairs); the partial
  products of each pair are summed here, one allreduce forward and one backward per pair.
- ``data``: the D ranks of its tensor index, which hold the same slice. The rows are cut over
  the data dimension (each data group reads 1/D of them), and the step's fused buffer
  ``[slice gradient | loss | rows | stop | step]`` is summed here, as data parallelism sums the
  whole gradient.

Each rank keeps only its slice of the parameters and of the optimiser state (arrays of the
parameters' length are sliced; counters are shared). The full model exists only when it is
needed whole, gathered by the tensor group's first rank: ``full_state`` for a checkpoint,
``gather_params`` for ``model.h5``. Metrics come from the slices (``outputs``: the sliced
forward pass, summed over the data group), and the divergence check is a flag summed over the
job. Both are written by rank 0 in the data-parallel format, so a run resumes on
any grid (or without tensor parallelism) and the model is used as any other.

The stop flag must reach every rank at the same step: each rank's flag rides in the tensor
group's first forward sum, and the group's agreed flag then goes into the data group's fused
buffer, so after the step every rank of the grid has seen every flag.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ..checkpoint import TrainState
from ..comm.base import Communicator
from ..device import Backend
from ..errors import ConfigError
from ..inference import CHUNK_ROWS
from ..kernels import param_count
from ..kernels import tensor as tk
from .step import StepContext
from .strategies import FusedReduction


def check_grid(cfg, size: int, source=None) -> None:
    """What only the job can tell: comm.tensor_ranks divides the rank count; rows from files."""
    k = cfg.comm.tensor_ranks
    if size % k:
        raise ConfigError(
            "comm.tensor_ranks",
            f"{k} does not divide the rank count {size} (a grid of ranks "
            "/ tensor_ranks data groups x tensor_ranks)",
        )
    if source is not None:
        raise ConfigError(
            "model.parallel",
            '"tensor" needs every rank of a tensor group to read the same rows of a file, not '
            "arrays in memory",
        )


class TensorGrid:
    """This rank's place in the data x tensor grid, its communicators and its model slice."""

    def __init__(self, comm: Communicator, k: int) -> None:
        self.world, self.k = comm, k
        self.data_index, self.tensor_index = divmod(comm.rank, k)
        self.tensor = comm.split(self.data_index, comm.rank)  # same rows, complementary slices
        self.data = comm.split(self.tensor_index, comm.rank)  # same slice, other rows
        self.plans: list[tk.TensorPlan] = []
        self.n_full = 0

    def set_model(self, sizes) -> None:
        self.plans = [tk.make_plan(sizes, self.k, t) for t in range(self.k)]
        self.n_full = param_count(sizes)

    @property
    def plan(self) -> tk.TensorPlan:
        return self.plans[self.tensor_index]

    @property
    def n_local(self) -> int:
        return self.plan.n_local

    # ---- slices <-> the full vector -----------------------------------------------------
    def local(self, full: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(full[self.plan.own], dtype=np.float64)

    def _assemble(self, parts: list) -> np.ndarray:
        full = np.empty(self.n_full)
        for plan, part in zip(self.plans, parts, strict=True):
            full[plan.own] = part  # replicated entries: the same values from every rank
        return full

    def gather_params(self, local: np.ndarray) -> np.ndarray | None:
        """The full parameter vector on the tensor group's first rank (None elsewhere)."""
        parts = self.tensor.gather(local, root=0)
        return None if parts is None else self._assemble(parts)

    def all_finite(self, local: np.ndarray) -> bool:
        """Whether every rank's slice is finite (the same answer on every rank)."""
        bad = np.array([0.0 if np.isfinite(local).all() else 1.0])
        return not self.world.allreduce_(bad)[0]

    def outputs(self, local: np.ndarray, X, model, device: Backend) -> np.ndarray:
        """The model's outputs on the rows of X (the tensor group's ranks all hold them; host
        rows, or the device's), computed from the slices by ``device``, ``CHUNK_ROWS`` rows at
        a time."""
        n = X.shape[0]
        out = np.empty((n, model.n_outputs))
        act, head = model.codes
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(n, lo + CHUNK_ROWS)
            device.sliced_forward(
                X[lo:hi], local, self.plan, act, head, out[lo:hi], self.tensor.allreduce_
            )
        return out

    def _localize_state(self, state: dict) -> dict:
        return {
            key: self.local(v) if np.ndim(v) == 1 and np.size(v) == self.n_full else v
            for key, v in state.items()
        }

    def localize(self, state: TrainState) -> TrainState:
        """A state read from a checkpoint (full) or made fresh (full parameters, an optimiser
        state of the slice's length): its parameters, optimiser state and best parameters
        sliced for this rank."""
        best = dict(state.best)
        if best.get("params") is not None and np.size(best["params"]) == self.n_full:
            best["params"] = self.local(best["params"])
        optimizer = state.optimizer
        if self.n_local != self.n_full:  # k = 1: the slice is the whole vector already
            optimizer = self._localize_state(optimizer)
        return dataclasses.replace(
            state, params=self.local(state.params), optimizer=optimizer, best=best
        )

    def full_state(self, state: TrainState) -> TrainState | None:
        """The whole state on the first rank of each tensor group (None elsewhere): the
        parameters, optimiser state and best parameters gathered from the slices."""
        best_local = state.best.get("params")
        parts = self.tensor.gather((state.params, state.optimizer, best_local), root=0)
        if parts is None:
            return None
        optimizer = {}
        for key in state.optimizer:
            values = [p[1][key] for p in parts]
            sliced = np.ndim(values[0]) == 1 and np.size(values[0]) == self.n_local
            optimizer[key] = self._assemble(values) if sliced else np.array(values[0], copy=True)
        best = dict(state.best)
        if best_local is not None:
            best["params"] = self._assemble([p[2] for p in parts])
        params = self._assemble([p[0] for p in parts])
        return dataclasses.replace(state, params=params, optimizer=optimizer, best=best)


class TensorReduction(FusedReduction):
    """The step of one slice: the device's ``sliced_gradient`` (``kernels.tensor`` or
    ``kernels.cuda_tensor``, its sums over the tensor group inside), then the fused buffer
    summed over the data group, carrying the group's agreed stop flag (sampled when the step
    began)."""

    in_place = False  # the slices' kernels take the batch's rows as an array

    def __init__(
        self,
        grid: TensorGrid,
        act: int,
        head: int,
        stop,
        timers=None,
        device: Backend | None = None,
    ) -> None:
        super().__init__(None, grid.data)
        self.grid, self.act, self.head, self.stop = grid, act, head, stop
        self.device = tk if device is None else device  # (the CPU kernels' module: the same call)
        self.timers = timers
        self.flag = 0.0
        self._waited = 0.0

    def _tensor_allreduce(self, buf: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        self.grid.tensor.allreduce_(buf)
        self._waited += time.perf_counter() - t0
        return buf

    def local_sums(self, params, X, y, out: np.ndarray, rows=None) -> None:  # noqa: ARG002
        flag = 1.0 if self.stop.requested else 0.0
        self._waited = 0.0
        self.flag = self.device.sliced_gradient(
            X, y, params, self.grid.plan, self.act, self.head, out, self._tensor_allreduce, flag
        )
        if self.timers is not None:  # the tensor group's sums are communication, not compute
            self.timers.seconds["comm"] += self._waited
            self.timers.seconds["compute"] -= self._waited  # (this runs inside "compute")

    def reduce_(self, buf: np.ndarray) -> None:
        buf[-2] = 1.0 if self.flag > 0 else 0.0  # the tensor group's flag, not this rank's own
        self.reducer.allreduce_(buf)

    def ireduce_(self, buf: np.ndarray):  # pragma: no cover - refused by the config check
        raise NotImplementedError("tensor parallelism is sync only")


@dataclass(slots=True)
class TensorStepContext(StepContext):
    """The step context on a grid: ``comm`` is the data group (its buffer's step slot sums D
    counters); fault hooks still name ranks of the job (``world_rank``)."""

    world_rank: int = 0

    def mark(self, buf: np.ndarray, step: int) -> None:
        buf[-2] = 1.0 if self.stop.requested else 0.0  # replaced by the group's flag
        buf[-1] = float(self.hooks.before_step(self.world_rank, step))


def tensor_step_context(setup, timers, stop, hooks) -> StepContext:
    """The step context of a tensor-parallel run: the slice's L2 mask, the data group's
    communicator for the fused buffer, the sliced reduction."""
    grid, model = setup.grid, setup.model
    act, head = model.codes
    l2 = (model.weight_mask() * setup.cfg.model.l2)[grid.plan.own]
    ctx = TensorStepContext(
        world_rank=grid.world.rank,
        comm=grid.data,
        backend=grid.data,
        device=setup.device,
        sizes=np.asarray(model.sizes, dtype=np.int64),
        act=act,
        head=head,
        l2_mask=np.ascontiguousarray(l2),
        timers=timers,
        stop=stop,
        hooks=hooks,
    )
    ctx.reduction = TensorReduction(grid, act, head, stop, timers, setup.device)
    return ctx

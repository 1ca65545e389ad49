"""In-process stand-ins for the training step's tests: simulated ranks (threads sharing a fake
communicator), the real Numba CPU kernels, and a float64 NumPy reference of the linear model."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
from lepton_hpc.kernels import cpu

from lepton_hpc.comm.base import Communicator
from lepton_hpc.device import Device
from lepton_hpc.faults import FaultHooks, StopFlag
from lepton_hpc.models import Model
from lepton_hpc.training.step import StepContext, Timers
from lepton_hpc.training.strategies import make_reduction

_KERNEL_LOCK = threading.Lock()  # Numba's default thread pool is not re-entrant from threads


class FakeWorld:
    """What ``size`` simulated ranks share: a barrier and one slot per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def exchange(self, rank: int, obj) -> list:
        """Every rank's ``obj``, in rank order (a collective: all ranks must call it)."""
        self.barrier.wait()
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class _Request:
    def __init__(self, comm: FakeComm, buf: np.ndarray) -> None:
        self.comm, self.buf = comm, buf

    def Wait(self) -> None:
        self.comm.allreduce_(self.buf)


class FakeComm(Communicator):
    """One simulated rank: sums in rank order, so results do not depend on thread timing."""

    name = "fake"

    def __init__(self, world: FakeWorld, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.size

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        parts = self.world.exchange(self.rank, buf.copy())
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        buf[...] = total
        return buf

    def iallreduce_(self, buf: np.ndarray) -> _Request:
        return _Request(self, buf)  # completes at Wait, which every rank calls in turn

    def allgather(self, obj):
        return self.world.exchange(self.rank, obj)

    def bcast(self, obj, root: int = 0):
        return self.world.exchange(self.rank, obj)[root]

    def barrier(self) -> None:
        self.world.barrier.wait()


def run_ranks(size: int, fn) -> list:
    """``fn(comm)`` on ``size`` simulated ranks at once; their results in rank order."""
    world = FakeWorld(size)
    results: list = [None] * size
    errors: list = [None] * size

    def one(rank: int) -> None:
        try:
            results[rank] = fn(FakeComm(world, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the test's thread
            errors[rank] = exc
            world.barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


class LockedCPU(Device):
    """The real CPU kernels, one call at a time (simulated ranks are threads)."""

    def gradient(self, X, y, params, sizes, activation, head, out) -> None:
        with _KERNEL_LOCK:  # the device's own call: copied batches and batches read in place
            Device.gradient(self, X, y, params, sizes, activation, head, out)


def cpu_device() -> Device:
    return LockedCPU("cpu", cpu, threads=1)


LINEAR = Model("linear", (4, 1), head="squared")


def context(
    comm, *, l2: float = 0.0, hooks: str = "", stop: bool = False, reproducible=False
) -> StepContext:
    """A step context for the 4-feature linear model on ``comm``, with its reduction."""
    flag = StopFlag()
    flag.signum = 15 if stop else 0
    act, head = LINEAR.codes
    return StepContext(
        comm,
        comm,
        cpu_device(),
        np.asarray(LINEAR.sizes, dtype=np.int64),
        act,
        head,
        LINEAR.weight_mask() * l2,
        Timers(),
        flag,
        FaultHooks(hooks),
    )


def with_reduction(ctx: StepContext, file_rows=None, n_file_rows: int = 0, **comm_cfg):
    cfg = SimpleNamespace(**{"reproducible": False, "compression": "none", **comm_cfg})
    ctx.reduction = make_reduction(cfg, ctx, file_rows, n_file_rows)
    return ctx


def data(n: int = 60, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a noisy linear problem with 4 features (float64)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.7 + 0.1 * rng.normal(size=n)
    return X, y


def reference_sums(X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, float]:
    """float64 NumPy: summed gradient of sum_i (x_i w + b - y_i)^2, and the loss sum."""
    r = X @ params[:-1] + params[-1] - y
    return np.r_[2.0 * X.T @ r, 2.0 * r.sum()], float(r @ r)


def reference_gradient(X, y, params, l2: float = 0.0) -> np.ndarray:
    """Mean gradient of the rows plus L2 on the weights (not the bias)."""
    sums, _ = reference_sums(X, y, params)
    return sums / len(X) + l2 * np.r_[params[:-1], 0.0]

"""Horovod communicator: the training allreduce through Horovod's MPI ops, the rest through MPI.

``HorovodComm`` wraps the job's world communicator. The fused training buffer (float64 NumPy) is
handed to Horovod as a zero-copy ``torch.from_numpy`` view and summed in place with
``hvd.allreduce_(t, op=hvd.Sum)``; everything else (bcast, allgather, barrier, abort, node ranks,
min/max) goes to the wrapped communicator, so data loading and checkpoints do not change.

``hvd.init()`` runs after mpi4py has initialised MPI, so Horovod reuses MPI_COMM_WORLD; its ranks
must therefore be the world's. Horovod is optional: where ``horovod.torch`` does not import (or was
built without MPI) asking for the backend is a ``LeptonError`` that says how to install it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from ..errors import LeptonError
from .base import Communicator

T = TypeVar("T")

INSTALL_HINT = (
    "install it with `make install-horovod` (runs scripts/install_horovod.sh on the venv: "
    "torch==2.13.0, then Horovod 0.28.1 built with PyTorch and MPI), or set "
    'comm.backend = "mpi"'
)


def load_horovod() -> ModuleType:
    """``horovod.torch``, built with MPI; a ``LeptonError`` with the install command otherwise."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise LeptonError(
            f'comm.backend = "horovod" needs Horovod with PyTorch, which does not import here '
            f"({exc}); {INSTALL_HINT}"
        ) from None
    if not hvd.mpi_built():
        raise LeptonError(
            f'comm.backend = "horovod": this Horovod was built without MPI; {INSTALL_HINT}'
        )
    return hvd


class HorovodRequest:
    """A started Horovod allreduce; ``Wait()`` blocks until the buffer holds the sum."""

    def __init__(self, hvd: ModuleType, handle: Any, tensor: Any) -> None:
        self._hvd, self._handle, self._tensor = hvd, handle, tensor  # keep the view alive

    def Wait(self) -> None:  # noqa: N802 - the name mpi4py's requests have
        if self._handle is not None:
            self._hvd.synchronize(self._handle)
            self._handle = self._tensor = None


class HorovodComm(Communicator):
    """``allreduce_``/``iallreduce_`` through Horovod; every other call through ``world``."""

    name = "horovod"

    def __init__(self, world: Communicator) -> None:
        hvd = load_horovod()
        import torch

        hvd.init()  # MPI is already initialised by mpi4py: Horovod takes MPI_COMM_WORLD
        if (hvd.rank(), hvd.size()) != (world.rank, world.size):
            raise LeptonError(
                f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the job's communicator is "
                f"rank {world.rank} of {world.size}: the horovod backend needs MPI_COMM_WORLD"
            )
        self._hvd, self._torch, self._world = hvd, torch, world
        self.rank, self.size = world.rank, world.size
        self.node_rank, self.node_size = world.node_rank, world.node_size
        self._async = 0

    def _view(self, buf: np.ndarray):
        if not (buf.flags.c_contiguous and buf.flags.writeable):
            raise ValueError("allreduce_ needs a contiguous, writeable NumPy buffer")
        return self._torch.from_numpy(buf)  # shares memory: the sum lands in ``buf``

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        if self.size > 1:
            # One fixed name per dtype and length: Horovod's response cache then skips the
            # negotiation of the tensor's metadata after the first step.
            name = f"lepton.allreduce.{buf.dtype}.{buf.size}"
            self._hvd.allreduce_(self._view(buf), op=self._hvd.Sum, name=name)
        return buf

    def iallreduce_(self, buf: np.ndarray) -> HorovodRequest:
        """Start an in-place sum on Horovod's background thread; ``Wait()`` the request."""
        if self.size == 1:
            return HorovodRequest(self._hvd, None, None)
        tensor = self._view(buf)
        # Two names alternate: at most two requests are in flight at once (overlap strategy).
        name = f"lepton.iallreduce.{self._async % 2}.{buf.dtype}.{buf.size}"
        self._async += 1
        handle = self._hvd.allreduce_async_(tensor, op=self._hvd.Sum, name=name)
        return HorovodRequest(self._hvd, handle, tensor)

    # Everything else is the world communicator's.
    def allreduce_max_(self, buf: np.ndarray) -> np.ndarray:
        return self._world.allreduce_max_(buf)

    def allreduce_min_(self, buf: np.ndarray) -> np.ndarray:
        return self._world.allreduce_min_(buf)

    def exscan(self, value: int) -> int:
        return self._world.exscan(value)

    def bcast(self, obj: T, root: int = 0) -> T:
        return self._world.bcast(obj, root)

    def allgather(self, obj: T) -> list[T]:
        return self._world.allgather(obj)

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        return self._world.gather(obj, root)

    def barrier(self) -> None:
        self._world.barrier()

    def abort(self, code: int) -> None:
        self._world.abort(code)

    def split(self, color: int, key: int = 0) -> Communicator:
        return self._world.split(color, key)

    @property
    def mpi_comm(self) -> Any:
        return self._world.mpi_comm

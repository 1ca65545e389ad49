"""mpi4py communicator: in-place allreduce of contiguous NumPy buffers, the rest pickled."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from .base import Communicator

T = TypeVar("T")


class MPIComm(Communicator):
    """Wraps an ``MPI.Comm``; buffers go through the fast buffer interface, never pickle."""

    name = "mpi"

    def __init__(self, comm: MPI.Comm) -> None:
        self._comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.node_rank = node.Get_rank()
        self.node_size = node.Get_size()
        node.Free()

    @classmethod
    def world(cls) -> MPIComm:
        return cls(MPI.COMM_WORLD)

    @property
    def mpi_comm(self) -> MPI.Comm:
        return self._comm

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        if self.size > 1:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def allreduce_max_(self, buf: np.ndarray) -> np.ndarray:
        if self.size > 1:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return buf

    def allreduce_min_(self, buf: np.ndarray) -> np.ndarray:
        if self.size > 1:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
        return buf

    def iallreduce_(self, buf: np.ndarray) -> Any:
        """Start a non-blocking in-place sum; returns a request with ``Wait()``."""
        return self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def exscan(self, value: int) -> int:
        out = self._comm.exscan(int(value), op=MPI.SUM)
        return 0 if self.rank == 0 or out is None else int(out)

    def bcast(self, obj: T, root: int = 0) -> T:
        return self._comm.bcast(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        return self._comm.allgather(obj)

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        return self._comm.gather(obj, root=root)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int) -> None:
        self._comm.Abort(code)

    def split(self, color: int, key: int = 0) -> MPIComm:
        return MPIComm(self._comm.Split(color, key))

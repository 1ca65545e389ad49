"""The communicator interface, its size-1 version, and collective agreement on errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..errors import LeptonError

T = TypeVar("T")


class Communicator:
    """What the toolkit needs from a communicator; ``SerialComm`` and ``MPIComm`` implement it.

    ``rank``/``size`` are the job's, ``node_rank``/``node_size`` the rank's place on its node
    (from a shared-memory split, so they are right under mpirun, srun or alone).
    """

    rank: int = 0
    size: int = 1
    node_rank: int = 0
    node_size: int = 1
    name: str = "serial"

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that prints, writes shared files and coordinates."""
        return self.rank == 0

    # Collectives. Buffers are NumPy arrays reduced in place; objects are pickled.
    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allreduce_max_(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allreduce_min_(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def exscan(self, value: int) -> int:
        """Sum of ``value`` over lower ranks (0 on rank 0)."""
        return 0

    def bcast(self, obj: T, root: int = 0) -> T:
        return obj

    def allgather(self, obj: T) -> list[T]:
        return [obj]

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        return [obj]

    def barrier(self) -> None:
        return None

    def abort(self, code: int) -> None:
        raise SystemExit(code)

    def split(self, color: int, key: int = 0) -> Communicator:
        return self

    @property
    def mpi_comm(self) -> Any:
        """The mpi4py communicator for libraries that take one (h5py's mpio driver); or None."""
        return None


class SerialComm(Communicator):
    """A communicator of one rank: every collective is the identity."""


def agree(comm: Communicator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank and fail on all of them together if it failed on any.

    Each rank's ``LeptonError`` is gathered; when any rank failed, every rank raises the same
    ``CollectiveError`` carrying the lowest failing rank's message, so rank 0 can print it once and
    all ranks exit cleanly instead of leaving the others waiting in the next collective.
    """
    result: Any = None
    message: str | None = None
    code = 0
    try:
        result = fn()
    except LeptonError as exc:
        message, code = str(exc), exc.exit_code
    failures = [m for m in comm.allgather((message, code)) if m[0] is not None]
    if failures:
        raise CollectiveError(failures[0][0], failures[0][1])
    return result


class CollectiveError(LeptonError):
    """A ``LeptonError`` every rank knows about (raised by ``agree``); rank 0 reports it once."""

    collective = True

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

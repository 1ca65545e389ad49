"""Point-to-point messages and polite group waits: the MPI pieces of the task farm.

The task farm (``lepton_hpc.scheduler``) talks to its workers with small tagged messages and
keeps worker groups in step with a broadcast. Blocking MPI receives busy-poll a core for as long
as they wait, and the coordinator and idle workers wait for most of a sweep, so every wait here
polls a non-blocking request and sleeps in between (1 ms growing to ``MAX_POLL_S``): an idle rank
costs almost no CPU and leaves its core to the ranks that compute.

Like everything else that calls MPI, this lives in ``lepton_hpc.comm``; the scheduler only sees
``Mailbox`` and the functions below.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from .base import Communicator
from .mpi import MPIComm

T = TypeVar("T")

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG
FIRST_POLL_S = 0.001
MAX_POLL_S = 0.02


def _wait(request: MPI.Request, timeout_s: float | None) -> bool:
    """Poll ``request`` with a growing sleep; True once complete, False at ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = FIRST_POLL_S
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, MAX_POLL_S)
    return True


class Mailbox:
    """Tagged, pickled messages between ranks of one communicator, received without spinning."""

    def __init__(self, comm: Communicator) -> None:
        self._comm: MPI.Comm = comm.mpi_comm

    def send(self, obj: Any, dest: int, tag: int) -> None:
        """Send a small picklable object (it is buffered: the call returns at once)."""
        self._comm.send(obj, dest=dest, tag=tag)

    def receive(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> tuple[Any, int, int]:
        """The next matching message as (object, source rank, tag), waiting politely."""
        status = MPI.Status()
        pause = FIRST_POLL_S
        while not self._comm.Iprobe(source=source, tag=tag, status=status):
            time.sleep(pause)
            pause = min(2 * pause, MAX_POLL_S)
        src, got = status.Get_source(), status.Get_tag()
        return self._comm.recv(source=src, tag=got), src, got


def polite_bcast(comm: Communicator, obj: T, root: int = 0) -> T:
    """``comm.bcast`` that waits without spinning: a polled barrier first, then the broadcast.

    The root enters the barrier only once it has the object, so the broadcast that follows never
    blocks for long.
    """
    if comm.size == 1:
        return obj
    _wait(comm.mpi_comm.Ibarrier(), None)
    return comm.bcast(obj, root=root)


def sum_flags(comm: Communicator, flags: list[bool], timeout_s: float | None) -> list[int] | None:
    """For each flag, how many ranks of ``comm`` set it; None when not all arrived in time.

    A rank whose task failed uses a timeout: if a peer does not arrive, that peer is blocked in a
    collective of the failed task and only aborting the job can free it.
    """
    buf = np.array([1 if f else 0 for f in flags], dtype=np.int64)
    if comm.size == 1:
        return buf.tolist()
    out = np.zeros_like(buf)
    request = comm.mpi_comm.Iallreduce(buf, out, op=MPI.SUM)
    if not _wait(request, timeout_s):
        return None
    return out.tolist()


def duplicate(comm: Communicator) -> Communicator:
    """A fresh communicator over the same ranks (its own message space), node placement kept.

    Each task of the farm runs on a duplicate, so messages a failed task left behind can never
    match those of the next task or of the farm's own control traffic.
    """
    if comm.mpi_comm is None:
        return comm
    dup = MPIComm(comm.mpi_comm.Dup())
    dup.node_rank, dup.node_size = comm.node_rank, comm.node_size
    return dup


def release(comm: Communicator) -> None:
    """Free a communicator made by ``duplicate`` (collective over its ranks)."""
    mpi = comm.mpi_comm
    if mpi is not None and mpi not in (MPI.COMM_WORLD, MPI.COMM_SELF):
        mpi.Free()

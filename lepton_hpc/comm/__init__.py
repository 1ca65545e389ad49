"""Every collective of the toolkit lives in this package, and nowhere else.

``world()`` gives the communicator of the job (MPI when mpi4py is importable, else a size-1 one);
the math receives it and calls ``allreduce_``, never MPI itself.
"""

from __future__ import annotations

from .base import Communicator, SerialComm, agree


def world() -> Communicator:
    """The job's communicator: MPI's COMM_WORLD, or a size-1 stand-in without mpi4py."""
    try:
        from .mpi import MPIComm
    except ImportError:  # pragma: no cover - mpi4py is a hard dependency; kept for tools
        return SerialComm()
    return MPIComm.world()


def make_backend(name: str, comm: Communicator) -> Communicator:
    """The communicator that carries the training allreduce for ``comm.backend = name``."""
    if name == "mpi":
        return comm
    if name == "horovod":
        from .horovod import HorovodComm

        return HorovodComm(comm)
    raise ValueError(name)


__all__ = ["Communicator", "SerialComm", "agree", "make_backend", "world"]

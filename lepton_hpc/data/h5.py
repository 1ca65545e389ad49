"""Opening HDF5 files for a communicator: the mpio driver when h5py is parallel, else plain h5py.

Writes go to a temporary name that rank 0 renames once every rank has closed the file, so a
failed or interrupted job never leaves a partial output under the final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import h5py

from ..comm.base import Communicator, agree
from ..errors import LeptonError


def is_parallel() -> bool:
    """True when h5py was built against parallel HDF5 (the mpio driver is available)."""
    return bool(h5py.get_config().mpi)


def driver_kwargs(comm: Communicator) -> dict:
    """Keyword arguments that open a file collectively with the mpio driver, when possible."""
    if is_parallel() and comm.mpi_comm is not None:
        return {"driver": "mpio", "comm": comm.mpi_comm}
    return {}


def open_read(path: str | Path, comm: Communicator) -> h5py.File:
    """Open ``path`` read-only on every rank (collectively under mpio)."""
    return h5py.File(path, "r", **driver_kwargs(comm))


def check_writable(path: str | Path, *, force: bool) -> None:
    """The checks a new output file needs, run before any rank writes anything."""
    p = Path(path)
    if p.exists() and not force:
        raise LeptonError(f"output '{p}' exists; pass --force to replace it")
    parent = p.parent if str(p.parent) else Path()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeptonError(f"cannot create directory '{parent}': {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise LeptonError(f"directory '{parent}' is not writable")


@contextlib.contextmanager
def create_parallel(
    path: str | Path, comm: Communicator, *, force: bool = False
) -> Iterator[h5py.File]:
    """A new HDF5 file written by every rank, renamed into place only when complete."""
    final = Path(path)
    agree(comm, lambda: check_writable(final, force=force) if comm.is_root else None)
    tmp = final.with_name(f".{final.name}.tmp")
    fh = h5py.File(tmp, "w", **driver_kwargs(comm)) if (is_parallel() or comm.is_root) else None
    ok = False
    try:
        if fh is None:
            raise LeptonError("parallel writes need h5py built with MPI (make install does that)")
        yield fh
        ok = True
    finally:
        if fh is not None:
            fh.close()
        comm.barrier()
        if comm.is_root:
            if ok:
                tmp.replace(final)
            else:
                tmp.unlink(missing_ok=True)


def collective(dset: h5py.Dataset) -> contextlib.AbstractContextManager:
    """Collective I/O on ``dset`` when its file is open with mpio, else nothing special."""
    return dset.collective if dset.file.driver == "mpio" else contextlib.nullcontext()

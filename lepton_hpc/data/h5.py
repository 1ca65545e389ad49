"""Opening HDF5 files for a communicator: the mpio driver when h5py is parallel, else plain h5py.

Writes go to a temporary name that rank 0 renames (then fsyncs the directory) once every rank
has closed the file, so a failed or interrupted job never leaves a partial output under the final
name, and an output is never one of the command's inputs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py

from ..comm.base import CollectiveError, Communicator, agree
from ..errors import EXIT_FAILED, LeptonError
from ..safety import NO_INPUTS, WriteError, check_not_input, commit, temp_path


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
    if p.is_dir():
        raise LeptonError(f"output '{p}' is a directory")
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
    path: str | Path,
    comm: Communicator,
    *,
    force: bool = False,
    inputs: Mapping[str, str | Path] = NO_INPUTS,
    nbytes: int = 0,
) -> Iterator[h5py.File]:
    """A new HDF5 file written by every rank, renamed into place only when complete.

    ``inputs`` (role: path) are files the command reads: ``path`` may never be one of them, even
    with ``force``. The temporary name is rank 0's (host and pid), shared by all ranks because
    the file is opened collectively; it is removed on any failure. ``nbytes``: the data about to
    be written; a file system with less free space is refused before anything is written.
    """
    final = Path(path)

    def check() -> Path | None:
        if not comm.is_root:
            return None
        check_not_input(final, inputs, "--out")
        check_writable(final, force=force)
        check_space(final, nbytes)
        return temp_path(final)

    tmp = comm.bcast(agree(comm, check))
    ok = False
    try:
        fh = h5py.File(tmp, "w", **driver_kwargs(comm)) if (is_parallel() or comm.is_root) else None
    except BaseException:
        comm.barrier()
        if comm.is_root:
            tmp.unlink(missing_ok=True)
        raise
    try:
        if fh is None:
            raise LeptonError("parallel writes need h5py built with MPI (make install does that)")
        yield fh
        ok = True
    finally:
        # A refused write (full disk, quota) may fail on some ranks only: closing never skips
        # the agreement below, so no rank is left waiting in a collective.
        closed = True
        if fh is not None:
            try:
                fh.close()
            except Exception:  # noqa: BLE001 - reported below, once, for every rank
                closed = False
        closed = all(comm.allgather(closed))
        if comm.is_root:
            if ok and closed:
                commit(tmp, final)
            else:
                tmp.unlink(missing_ok=True)
    if not closed:
        raise CollectiveError(f"cannot write '{final}': the file could not be closed", EXIT_FAILED)


def check_space(path: Path, nbytes: int) -> None:
    """Refuse to start a write of ``nbytes`` (plus HDF5's overhead) that cannot fit: a write
    refused halfway fails through MPI-IO and HDF5, which is slower and leaves more to clean."""
    need = nbytes + (64 << 10) if nbytes else 0
    st = os.statvfs(path.parent if str(path.parent) else ".")
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise WriteError(
            f"cannot write '{path}': {os.strerror(errno.ENOSPC)} "
            f"(needs about {need >> 10} KiB, {free >> 10} KiB free)"
        )


def write_rows(dset: h5py.Dataset, start: int, values, comm: Communicator) -> None:
    """``dset[start:start + len(values)] = values``, collectively under mpio. A write the system
    refuses on any rank (full disk, quota: with MPI-IO often only an aggregator rank sees it) is
    a ``WriteError`` on every rank together, so no rank goes on alone into the next collective."""

    def write() -> None:
        try:
            with collective(dset):
                dset[start : start + len(values)] = values
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
            raise WriteError(f"cannot write '{dset.file.filename}': {reason}") from None

    agree(comm, write)


def collective(dset: h5py.Dataset) -> contextlib.AbstractContextManager:
    """Collective I/O on ``dset`` when its file is open with mpio, else nothing special."""
    return dset.collective if dset.file.driver == "mpio" else contextlib.nullcontext()

"""The run-directory marker and lock: which directories are the toolkit's, and which job owns one.

- Run directories carry a marker ``.lepton-run`` written when the toolkit creates or first uses
  them (``safety.write_marker``); only a marked directory may be cleared by ``--overwrite``.
- ``RunLock``: ``flock`` on ``<run dir>/.lepton-lock`` so two jobs never share a run directory;
  the second fails at once naming the holder.

What ``flock`` guarantees where run directories usually live: on local file systems it is
exclusive between all processes of the node. On Linux NFSv4 clients ``flock`` is emulated with
a whole-file byte-range lock, so it is exclusive across clients; on NFSv3 that needs the NLM lock
daemon (``lockd``/``rpc.statd``), and a ``nolock`` mount makes locks local to one client. On
Lustre, the ``flock`` mount option gives coherent locks across clients; ``localflock`` locks only
within one client node (two jobs on different nodes would both get the lock); ``noflock`` (the
default on some versions) makes ``flock`` fail with ENOSYS. When the file system does not support
``flock`` at all, the run goes on without a lock and ``RunLock.warning`` says so.

This module needs only the standard library and ``errors``, so ``safety`` builds its
run-directory checks on it (and re-exports its names) without an import cycle.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import LeptonError

MARKER = ".lepton-run"
LOCK = ".lepton-lock"
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def is_run_dir(path: Path) -> bool:
    """``path`` carries the toolkit's run-directory marker."""
    return (Path(path) / MARKER).is_file()


def _in_use(path: Path) -> LeptonError:
    """'run directory D is in use by pid P on host H (Slurm job J) since T', from the lock file."""
    try:
        info = json.loads((path / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    job = f" (Slurm job {info['slurm_job']})" if info.get("slurm_job") else ""
    return LeptonError(
        f"run directory '{path}' is in use by pid {info.get('pid', '?')} on host "
        f"{info.get('host', '?')}{job} since {info.get('since', '?')}"
    )


def _probe_lock(path: Path) -> None:
    """Refuse a run directory whose lock another job holds (without creating anything)."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR)  # NFS's emulated flock needs write access
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(path) from None
    except OSError:
        return
    finally:
        os.close(fd)  # closing drops the probe's lock


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lepton-lock``, held until ``release()``.

    The lock file stays after release: it is the toolkit's, and deleting it would race with a
    job taking it. ``warning`` is set (and nothing is locked) where the file system has no flock.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.warning = ""
        self._fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LeptonError(f"cannot create lock file '{self.path}': {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(0.2)  # let the holder finish writing who it is
            raise _in_use(self.directory) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in NO_FLOCK:
                raise
            self.warning = (
                f"run directory '{self.directory}': the file system does not support flock "
                f"({exc.strerror}); running without a lock, so make sure no other job uses it"
            )
            return
        self._fd = fd
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent); the holder's details are cleared first."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""The checkpoint mirror (``checkpoint.mirror = PATH``): a copy of every checkpoint elsewhere.

Layout: a run's copies live in ``<mirror>/<run dir name>-<8 hex digits>/``, the digits a hash of
the run directory's resolved absolute path, so runs mirroring to one PATH never mix (two run
directories named alike differ in the hash) and a run finds its own copies again when it
resumes. Moving the run directory (``output.dir`` changed on resume) starts a new subdirectory.
The mirror root carries a marker file ``.lepton-mirror``; the toolkit deletes there only what
rotation deletes in the primary: valid checkpoints of the run's current lineage beyond ``keep``.

Copies are asynchronous: rank 0 writes the checkpoint to ``<run dir>/checkpoints/`` as usual and
hands the file to a background thread, which copies its bytes atomically (temporary name, fsync,
rename, fsync of the directory) under the same name and rotates the mirror. The copy is not read
back: a damaged copy fails the checkpoint's own checksum when it is read, and ``--resume auto``
then skips it. While a copy is in flight, a newer checkpoint replaces any one still waiting (the
newest is what matters). A failed copy is a warning, never a failed run, and the step never
waits for the mirror; at the end of the run (also on a stop, a failure or a signal) the loop
waits for the pending copy at most ``WAIT_S`` seconds, then warns and goes on.

Rank 0 lists the mirror directory once when the loop starts (a mirror whose file system hangs
holds the start, never a step). ``--resume auto`` takes the newest valid checkpoint of the
primary directory and the mirror (``latest_valid`` over both); new checkpoints are numbered above
every name in the mirror too, so they never collide with an older copy there. A run that starts
fresh moves earlier copies in its mirror subdirectory aside (``aside-<UTC time>-<lineage>/``,
never deleted), so a later resume cannot pick a replaced run's checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path

from ..errors import LeptonError
from ..log import Log
from ..safety import atomic_file, check_not_input, note_leftovers, same_path
from .files import TrainState, _checkpoint_files
from .lineage import _KNOWN, _Known, _rotate, _stamp, move_aside

MARKER = ".lepton-mirror"
WAIT_S = 60.0  # how long the end of a run waits for a pending copy


def mirror_dir(mirror: str, run_dir: Path) -> Path | None:
    """The subdirectory of the mirror ``mirror`` that holds the copies of ``run_dir``'s
    checkpoints (None when the mirror is off)."""
    if not mirror:
        return None
    real = os.path.realpath(run_dir)
    tag = hashlib.sha256(real.encode()).hexdigest()[:8]
    return Path(mirror) / f"{Path(real).name or 'run'}-{tag}"


def _inside(path: Path, directory: Path) -> bool:
    p, d = os.path.realpath(path), os.path.realpath(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def check_mirror(mirror: str, run_dir: Path, inputs: dict) -> None:
    """Refuse a mirror that is a file, lies in the run's checkpoints directory (no backup at all)
    or is one of the run's inputs."""
    if not mirror:
        return
    path, checkpoints = Path(mirror), Path(run_dir) / "checkpoints"
    if path.exists() and not path.is_dir():
        raise LeptonError(f"checkpoint.mirror '{path}' is a file, not a directory")
    if _inside(path, checkpoints) or same_path(path, checkpoints):
        raise LeptonError(
            f"checkpoint.mirror '{path}' is inside the run's checkpoints directory "
            f"'{checkpoints}': choose a directory elsewhere (another file system)"
        )
    check_not_input(path, inputs, "checkpoint.mirror")


def _mark(root: Path) -> None:
    """Create the mirror root (when missing) and its marker."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.is_file():
        with atomic_file(marker) as tmp:
            tmp.write_text("lepton checkpoint mirror: copies of run checkpoints\n")


class Mirror:
    """Rank 0's copier of checkpoints into ``directory`` (``mirror_dir``); with ``directory``
    None (no mirror, or another rank) every method does nothing."""

    def __init__(self, directory: Path | None, log: Log) -> None:
        self.directory, self.log = directory, log
        self.floor = 0  # the highest seq named in the mirror directory
        self._cond = threading.Condition()
        self._pending: tuple | None = None
        self._busy = self._closed = False
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, mirror: str, run_dir: Path, state: TrainState, log: Log, root: bool) -> Mirror:
        """The mirror of this run (a no-op one when off or not rank 0). A fresh ``state`` (no
        lineage yet) moves the copies already in its directory aside."""
        m = cls(mirror_dir(mirror, run_dir) if root else None, log)
        if m.directory is None:
            return m
        note_leftovers(log, m.directory)  # a copy cut short by a crash
        if not state.lineage:
            try:
                move_aside(m.directory, (-1, -1), None, log)
            except (OSError, LeptonError) as exc:  # what stays is numbered below the new ones
                log.warning(f"checkpoint mirror '{m.directory}': {exc}")
        m.floor = max((key[0] for key, _ in _checkpoint_files(m.directory)), default=0)
        return m

    def copy(self, path: Path, state: TrainState, keep: int) -> None:
        """Copy the checkpoint ``path`` (just written from ``state``) in the background."""
        if self.directory is None:
            return
        job = (Path(path), state.lineage, state.seq, state.step, keep)
        with self._cond:
            self._pending = job
            self.floor = max(self.floor, state.seq)
            self._closed = False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="lepton-mirror", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the pending copy (at most ``timeout``, default ``WAIT_S``); False, with a
        warning, when it is still not done."""
        if self.directory is None:
            return True
        limit = WAIT_S if timeout is None else timeout
        with self._cond:
            done = self._cond.wait_for(lambda: not self._busy and self._pending is None, limit)
        if not done:
            self.log.warning(
                f"checkpoint mirror '{self.directory}': a copy is still pending after "
                f"{limit:g} s; going on without it (the checkpoints in the run directory are "
                "complete)"
            )
        return done

    def close(self, timeout: float | None = None) -> bool:
        """``wait``, then let the copying thread end once nothing is pending (a sweep runs many
        trainings in one process)."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    self._thread = None  # a later copy starts a new thread
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._copy(*job)
            except Exception as exc:  # noqa: BLE001 - a failed copy must never fail the run
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                self.log.warning(
                    f"checkpoint mirror: could not copy '{job[0]}' to '{self.directory}': {reason}"
                )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _copy(self, source: Path, lineage: str, seq: int, step: int, keep: int) -> None:
        directory = self.directory
        assert directory is not None
        _mark(directory.parent)
        directory.mkdir(exist_ok=True)
        target = directory / source.name
        if os.path.lexists(target):  # never replace a file (numbering makes this rare)
            raise FileExistsError(f"'{target}' exists already")
        with source.open("rb") as src, atomic_file(target) as tmp, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        stamp = _stamp(target)
        if stamp is not None:  # its identity is known: rotation never reads a copy back
            _KNOWN[os.path.abspath(target)] = _Known(stamp, True, lineage, seq, step)
        with contextlib.suppress(FileNotFoundError):
            _rotate(directory, lineage, keep, _checkpoint_files(directory))

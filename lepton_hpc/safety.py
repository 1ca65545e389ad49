"""Every write and delete of the toolkit goes through here, so careless use never destroys a
user's files.

- Atomic files: ``atomic_file(final)`` yields a per-process temporary name beside ``final``
  (``.{name}.{host}.{pid}.tmp``); on success the file is fsynced, renamed onto ``final`` and the
  directory fsynced (so the rename survives a crash); on any error the temporary is removed.
- Input guards: an output never replaces a file the command reads (``same_path`` sees through
  symlinks and hard links), and a directory holding an input is never cleared.
- Run directories carry a marker ``.lepton-run`` written when the toolkit creates or first uses
  them. ``--overwrite`` clears only a marked directory, and only the files the toolkit writes
  there: a user's other files and every input stay.
- ``RunLock`` (in ``rundir``, re-exported here): ``flock`` on ``<run dir>/.lepton-lock`` so two
  jobs never share a run directory; the second fails at once naming the holder. What ``flock``
  guarantees on local, NFS and Lustre file systems is described in ``rundir``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from glob import escape as glob_escape
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import EXIT_FAILED, LeptonError
from .rundir import LOCK, MARKER, NO_FLOCK, RunLock, _probe_lock, is_run_dir

__all__ = [
    "LOCK",
    "MARKER",
    "NO_FLOCK",
    "NO_INPUTS",
    "REFUSED",
    "RUN_FILES",
    "RunLock",
    "WriteError",
    "atomic_file",
    "atomic_write_text",
    "check_no_input_inside",
    "check_not_input",
    "check_run_dir",
    "clear_run_dir",
    "commit",
    "create_run_dir",
    "finite_json",
    "fsync_dir",
    "is_run_dir",
    "make_marked_dir",
    "make_scratch_dir",
    "note_leftovers",
    "remove_leftover_temporaries",
    "remove_scratch_dir",
    "same_path",
    "temp_path",
    "write_json",
    "write_marker",
]

# The files the toolkit writes at the top of a run directory (all that --overwrite removes there).
RUN_FILES = ("status.json", "metrics.jsonl", "results.json", "model.h5", "history.png")
NO_INPUTS: Mapping[str, str | Path] = MappingProxyType({})
# A write the system refused (full disk, quota, file size limit, read-only): not a toolkit bug.
REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class WriteError(LeptonError):
    """The file system refused a write; the message names the file and the reason."""

    exit_code = EXIT_FAILED


# ---- atomic files -------------------------------------------------------------------------
def temp_path(final: Path) -> Path:
    """The temporary name of ``final`` for this process: unique per host and pid."""
    final = Path(final)
    return final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename in it) to stable storage, where supported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it onto ``final``, fsync the directory (so the rename is durable)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_file(final: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``final`` through; renamed into place only on success.

    On any exception (a full disk included) the temporary is removed and the exception raised
    again, so neither a partial ``final`` nor a temporary is ever left behind. ``tmp`` overrides
    the temporary name (a collectively written file needs one name on all ranks).
    """
    final = Path(final)
    tmp = temp_path(final) if tmp is None else Path(tmp)
    try:
        yield tmp
        commit(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in REFUSED:
            raise WriteError(f"cannot write '{final}': {os.strerror(exc.errno)}") from None
        raise


# The final names whose temporaries a run may find left behind by a writer that died mid-write
# (SIGKILL, a lost node): checkpoints, and the run directory's own files.
LEFTOVER_NAMES = (
    r"ckpt-\d+(?:-\d+)?\.h5|status\.json|metrics\.jsonl|results\.json|model\.h5|\.lepton-run"
)
_TEMP = re.compile(rf"\.(?P<name>{LEFTOVER_NAMES})\.(?P<host>.+)\.(?P<pid>\d+)\.tmp")
STALE_TEMP_S = 300.0  # a temporary written on another host is its writer's until this old


def _writer_gone(host: str, pid: int, path: Path) -> bool:
    if host == socket.gethostname():
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:  # another host: its process cannot be asked; an old temporary is abandoned
        return time.time() - path.lstat().st_mtime > STALE_TEMP_S
    except OSError:
        return False


def remove_leftover_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries ``atomic_file`` left in ``directory`` when their writer died before
    renaming them (only the toolkit's names, only plain files, only when the writer is gone:
    on this host its pid is dead, on another the file is over ``STALE_TEMP_S`` old). Called by
    the process that holds the run directory's lock; returns what it removed."""
    removed = []
    try:
        candidates = sorted(Path(directory).glob(".*.tmp"))
    except OSError:
        return removed
    for path in candidates:
        m = _TEMP.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_file():
            continue
        if _writer_gone(m["host"], int(m["pid"]), path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


SCRATCH_PREFIX = "lepton-scratch-"


def make_scratch_dir(parent: str | Path | None = None) -> Path:
    """A new private (0700) temporary directory that only the toolkit uses and later removes."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))


def remove_scratch_dir(path: str | Path) -> None:
    """Remove a directory ``make_scratch_dir`` made, with what the toolkit wrote in it; refuses
    any other directory (a wrong path must never become a recursive delete)."""
    import shutil

    path = Path(path)
    if not path.name.startswith(SCRATCH_PREFIX) or path.is_symlink():
        raise ValueError(f"'{path}' is not a scratch directory of the toolkit")
    shutil.rmtree(path, ignore_errors=True)


def note_leftovers(log, *directories: Path) -> list[Path]:
    """``remove_leftover_temporaries`` on each directory, with one log line when it removed any."""
    removed = [p for d in directories for p in remove_leftover_temporaries(d)]
    if removed:
        names = ", ".join(str(p) for p in removed)
        log.info(f"removed {len(removed)} temporary file(s) left by an interrupted write: {names}")
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(Path(path)) as tmp, tmp.open("w") as fh:
        fh.write(text)


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (NumPy's too) replaced by None and NumPy scalars and
    arrays turned into Python values, so the result is strict JSON."""
    if isinstance(obj, Mapping):
        return {
            (k if isinstance(k, str | int | float | bool) or k is None else str(k)): finite_json(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if type(obj).__module__ == "numpy":
        if hasattr(obj, "tolist"):  # arrays and scalars
            return finite_json(obj.tolist())
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (non-finite numbers as null), atomically."""
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False, default=str)
    atomic_write_text(Path(path), text + "\n")


# ---- input guards -------------------------------------------------------------------------
def same_path(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` are one file (symlinks and hard links seen through)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str | Path, directory: str | Path) -> bool:
    """``path`` is ``directory`` or lies under it (after resolving links)."""
    p, d = os.path.realpath(path), os.path.realpath(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def _role(role: str) -> str:
    return {"data": "data file", "model": "model file"}.get(role, f"{role} file")


def check_not_input(path: str | Path, inputs: Mapping[str, str | Path], what: str) -> None:
    """Refuse an output ``path`` that is one of ``inputs`` (role: path), whatever --force says."""
    for role, src in inputs.items():
        if src and same_path(path, src):
            raise LeptonError(
                f"{what} '{path}' is the input {_role(role)} '{src}': "
                "refusing to overwrite an input"
            )


def check_no_input_inside(
    directory: str | Path, inputs: Mapping[str, str | Path], what: str
) -> None:
    """Refuse to clear ``directory`` when it holds (or is) one of ``inputs``."""
    for role, src in inputs.items():
        if src and (_inside(src, directory) or same_path(src, directory)):
            raise LeptonError(
                f"{what} '{directory}' holds the input {_role(role)} '{src}': refusing to clear "
                "it; choose another output.dir"
            )


# ---- run directories ----------------------------------------------------------------------
def _abandoned(entry: Path) -> bool:
    """``entry`` is a temporary of the toolkit whose writer is gone (see ``_TEMP``)."""
    m = _TEMP.fullmatch(entry.name)
    return (
        m is not None
        and not entry.is_symlink()
        and entry.is_file()
        and _writer_gone(m["host"], int(m["pid"]), entry)
    )


def _nonempty(path: Path) -> bool:
    """``path`` is a directory holding something other than abandoned toolkit temporaries (a
    marker half-written by a job killed as it created the directory leaves one)."""
    return path.is_dir() and any(not _abandoned(e) for e in path.iterdir())


def _check_clearable(path: Path, inputs: Mapping[str, str | Path]) -> None:
    """--overwrite may clear ``path``: empty or absent, or a marked run directory without inputs."""
    if not _nonempty(path):
        return
    if not is_run_dir(path):
        raise LeptonError(
            f"'{path}' is not a lepton run directory (no {MARKER} marker): refusing to clear it; "
            "choose another output.dir"
        )
    check_no_input_inside(path, inputs, "--overwrite: run directory")


def check_run_dir(
    path: Path,
    *,
    resume: bool,
    overwrite: bool,
    inputs: Mapping[str, str | Path] = NO_INPUTS,
) -> None:
    """Refuse, before anything is read or written, a run directory that may not be used."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LeptonError(f"run directory '{path}' is a file")
    for name in RUN_FILES:
        check_not_input(path / name, inputs, "run file")
    marked = is_run_dir(path)
    if _nonempty(path) and not (resume or overwrite):
        hint = " or --overwrite to replace its results" if marked else ""
        raise LeptonError(
            f"run directory '{path}' exists and is not empty; choose a new output.dir or pass "
            f"--resume auto to continue it{hint}"
        )
    if overwrite:
        _check_clearable(path, inputs)
    if path.is_dir():
        _probe_lock(path)
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LeptonError(f"cannot create run directory '{path}': '{ancestor}' is a file")
    if not os.access(ancestor, os.W_OK):
        raise LeptonError(f"cannot create run directory '{path}': '{ancestor}' is not writable")


def write_marker(path: Path) -> None:
    """Mark ``path`` as a lepton run directory (when not yet marked)."""
    if is_run_dir(path):
        return
    from . import __version__

    write_json(
        Path(path) / MARKER,
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "lepton_version": __version__,
        },
    )


def _toolkit_files(path: Path) -> Iterator[Path]:
    """The files the toolkit writes in a run directory (what --overwrite removes)."""
    yield from (path / name for name in RUN_FILES)
    yield from path.glob(".*.tmp")
    yield from path.glob(".history.png*.tmp.png")
    ckpt = path / "checkpoints"
    for d in [ckpt, *sorted(ckpt.glob("aside-*"))]:
        yield from d.glob("ckpt-*.h5")
        yield from d.glob(".*.tmp")


def make_marked_dir(path: Path) -> None:
    """Create ``path`` with its marker in one step, when it does not exist yet: the marker is
    written into a temporary sibling directory that is then renamed onto ``path``. A job killed
    at any point so leaves either no ``path`` or a marked one, never an unmarked directory that
    a retry (``--overwrite``) would have to refuse. Sibling temporaries of dead writers (holding
    only a marker) are removed first."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?P<host>.+)\.(?P<pid>\d+)\.tmp")
    for old in parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        m = pattern.fullmatch(old.name)
        if m is None or old.is_symlink() or not old.is_dir():
            continue
        entries = list(old.iterdir())
        if _writer_gone(m["host"], int(m["pid"]), old) and all(
            e.name == MARKER or _TEMP.fullmatch(e.name) for e in entries
        ):
            for e in entries:
                with contextlib.suppress(OSError):
                    e.unlink()
            with contextlib.suppress(OSError):
                old.rmdir()
    if path.exists() or path.is_symlink():
        return
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        write_marker(tmp)
        try:
            os.rename(tmp, path)  # onto a missing or empty directory: atomic
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            return  # another process created it first: the caller marks it as before
        fsync_dir(parent)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                (tmp / MARKER).unlink()
            with contextlib.suppress(OSError):
                tmp.rmdir()


def create_run_dir(
    path: Path,
    *,
    overwrite: bool,
    inputs: Mapping[str, str | Path] = NO_INPUTS,
) -> RunLock:
    """Create (or take) the run directory on rank 0: mark it, lock it, and with ``overwrite``
    remove the toolkit's own files from it. Returns the lock; the caller releases it at the end.

    Called once the inputs have been validated, so a bad input never destroys an old run.
    """
    path = Path(path)
    if overwrite:
        _check_clearable(path, inputs)
    try:
        make_marked_dir(path)
        write_marker(path)
    except OSError as exc:
        raise LeptonError(f"cannot create run directory '{path}': {exc.strerror}") from None
    lock = RunLock(path)
    if overwrite:
        try:
            clear_run_dir(path, inputs)
        except BaseException:
            lock.release()
            raise
    return lock


def clear_run_dir(path: Path, inputs: Mapping[str, str | Path] = NO_INPUTS) -> list[Path]:
    """Remove the toolkit's files from the run directory ``path`` (never the marker, the lock,
    an input or any other file); returns what was removed."""
    removed = []
    for f in list(_toolkit_files(path)):
        if f.is_symlink() or not f.is_file():
            continue
        if any(src and same_path(f, src) for src in inputs.values()):
            continue
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            removed.append(f)
    ckpt = path / "checkpoints"
    for d in [*sorted(ckpt.glob("aside-*")), ckpt]:
        with contextlib.suppress(OSError):  # not empty: a user's file stays, and so does d
            d.rmdir()
    if removed:
        fsync_dir(path)
    return removed

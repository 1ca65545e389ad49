"""Checkpoint lineages: writing with rotation, ``--resume auto``'s choice, setting branches aside.

Every checkpoint records a ``lineage`` id (random, made when a run starts fresh and kept while it
resumes from its own newest checkpoint), the ``parent`` it branched from (when it resumed from an
older checkpoint, or one from elsewhere) and a write sequence number ``seq``, one above every
checkpoint already in the directory.

- Rotation keeps the newest ``keep`` checkpoints of the current lineage, by ``seq``; it deletes
  only valid files of that lineage, never another lineage's, a damaged file, or any file whose
  name is not a checkpoint name.
- ``--resume auto`` takes the valid checkpoint with the highest ``seq``; when checkpoints exist
  but none is valid it is an error naming each file, not a fresh start.
- ``--resume PATH`` to an older checkpoint of the directory moves the checkpoints written after
  it into ``checkpoints/aside-<UTC time>-<lineage>/`` (renamed, never deleted), so a later
  ``--resume auto`` continues the branch the user chose.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LeptonError
from ..log import Log
from ..safety import fsync_dir, same_path
from .files import (
    DamagedCheckpoint,
    TrainState,
    _checkpoint_files,
    _name,
    _write,
    new_lineage,
    read_checkpoint,
)

ASIDE = "aside-"


@dataclass(frozen=True, slots=True)
class _Known:
    stamp: tuple[int, int, int]  # inode, size, mtime: the file version that was verified
    valid: bool
    lineage: str = ""
    seq: int = 0
    step: int = 0


# Checkpoints verified by this process, by path: rotation reads a file again only when it changed
# (a checkpoint this process wrote is never read back just to be rotated).
_KNOWN: dict[str, _Known] = {}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path, state: TrainState) -> None:
    stamp = _stamp(path)
    if stamp is not None:
        _KNOWN[os.path.abspath(path)] = _Known(stamp, True, state.lineage, state.seq, state.step)


def _identity(path: Path) -> _Known | None:
    """Lineage, seq and step of the checkpoint ``path``, verified once per file version;
    ``valid`` is False for a damaged file; None when it is gone."""
    stamp = _stamp(path)
    if stamp is None:
        return None
    key = os.path.abspath(path)
    known = _KNOWN.get(key)
    if known is not None and known.stamp == stamp:
        return known
    try:
        st = read_checkpoint(path)
    except LeptonError:
        known = _Known(stamp, False)
    else:
        known = _Known(stamp, True, st.lineage, st.seq, st.step)
    _KNOWN[key] = known
    return known


def write_checkpoint(directory: Path, state: TrainState, keep: int, *, floor: int = 0) -> Path:
    """Write ``state`` atomically as ``ckpt-<seq>-<step>.h5`` and keep the newest ``keep`` of its
    lineage. A state without a lineage (a fresh run) gets one here; ``state.seq`` is set to
    the new file's sequence number (one above every checkpoint name in ``directory`` and above
    ``floor``, the highest seq of the checkpoint mirror, so the copy's name is new there too)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not state.lineage:
        state.lineage = new_lineage()
    files = _checkpoint_files(directory)
    before = state.seq
    seq = max([state.seq, floor, *(key[0] for key, _ in files)]) + 1
    final = directory / _name(seq, state.step)
    while os.path.lexists(final):  # never replace a file (not even one seen as damaged)
        seq += 1
        final = directory / _name(seq, state.step)
    state.seq = seq
    try:
        _write(final, state)
    except BaseException:
        state.seq = before
        raise
    _remember(final, state)
    _rotate(directory, state.lineage, keep, [*files, ((seq, state.step), final)])
    return final


def _rotate(
    directory: Path, lineage: str, keep: int, files: list[tuple[tuple[int, int], Path]]
) -> list[Path]:
    """Delete all but the newest ``keep`` valid checkpoints of ``lineage`` among ``files``."""
    mine = []
    for _, path in files:
        known = _identity(path)
        if known is not None and known.valid and known.lineage == lineage:
            mine.append((known.seq, known.step, path))
    mine.sort()
    removed = []
    for *_, path in mine[: -max(keep, 1)]:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        _KNOWN.pop(os.path.abspath(path), None)
        removed.append(path)
    if removed:
        fsync_dir(directory)
    return removed


# ---- choosing where to resume ---------------------------------------------------------------
def latest_valid(directory: Path, log: Log, *more: Path) -> tuple[Path, TrainState] | None:
    """The valid checkpoint with the highest ``seq`` (``--resume auto``) of ``directory`` and the
    directories ``more`` (the checkpoint mirror; on equal names ``directory``'s file is taken);
    None when there is no checkpoint at all. Damaged ones are skipped with one warning each; when
    checkpoints exist but none is valid, a ``LeptonError`` names each file and why."""
    dirs = [Path(d) for d in (directory, *more)]
    files = sorted(
        (key, -i, path) for i, d in enumerate(dirs) for key, path in _checkpoint_files(d)
    )
    problems = []
    for *_, path in reversed(files):
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as exc:
            log.warning(f"{exc}; trying the previous one")
            problems.append(f"{path.name if len(dirs) == 1 else path} ({exc.reason})")
    if problems:
        where = "', '".join(map(str, dirs))
        raise LeptonError(
            f"checkpoints exist but none is valid: {', '.join(problems)} (in '{where}'; "
            "name one to resume from with --resume PATH, or start anew with --overwrite)"
        )
    return None


def set_aside_newer(path: Path, state: TrainState, directory: Path, log: Log) -> list[Path]:
    """When ``path`` (already read as ``state``) is a checkpoint of ``directory``, move every
    checkpoint written after it (a higher ``seq``, damaged ones included) into a new
    ``directory/aside-<UTC time>-<lineage>/``: renamed, never deleted, directories fsynced.
    Returns where they went; nothing moves for a checkpoint from elsewhere."""
    path, directory = Path(path), Path(directory)
    if not same_path(path.parent, directory):
        return []
    return move_aside(directory, (state.seq, state.step), path, log)


def move_aside(directory: Path, after: tuple[int, int], path: Path | None, log: Log) -> list[Path]:
    """Move the checkpoints of ``directory`` named above ``after`` (seq, step) into a new
    ``directory/aside-<UTC time>-<lineage>/`` (renamed, never deleted); ``path`` (the checkpoint
    resumed from, or None) is named in the log line and never moved."""
    directory = Path(directory)
    newer = [(k, p) for k, p in _checkpoint_files(directory) if k > after]
    newer = [(k, p) for k, p in newer if path is None or not same_path(p, path)]
    if not newer:
        return []
    label = "unknown"
    for _, p in reversed(newer):
        known = _identity(p)
        if known is not None and known.valid:
            label = known.lineage or "format1"
            break
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = directory / f"{ASIDE}{stamp}-{label}", 1
    while True:
        try:
            aside.mkdir()
            break
        except FileExistsError:
            n += 1
            aside = directory / f"{ASIDE}{stamp}-{label}-{n}"
        except OSError as exc:
            raise LeptonError(f"cannot create '{aside}': {exc.strerror}") from None
    moved = []
    try:
        for _, p in newer:
            target = aside / p.name
            os.rename(p, target)
            _KNOWN.pop(os.path.abspath(p), None)
            moved.append(target)
    except OSError as exc:
        raise LeptonError(
            f"cannot move checkpoint '{p}' aside into '{aside}': {exc.strerror} "
            f"({len(moved)} moved before it)"
        ) from None
    finally:
        fsync_dir(aside)
        fsync_dir(directory)
    names = ", ".join(p.name for p in moved)
    said = (
        f"resuming from '{path}': moved the {len(moved)} checkpoint(s) written after it"
        if path is not None
        else f"a new run: moved the {len(moved)} checkpoint(s) already in '{directory}'"
    )
    log.info(f"{said} to '{aside}': {names}")
    return moved


def _branch(state: TrainState, path: Path) -> None:
    """Start a new lineage on ``state``, whose parent is the checkpoint it was read from."""
    state.parent = {
        "lineage": state.lineage,
        "seq": state.seq,
        "step": state.step,
        "file": str(path),
    }
    state.lineage = new_lineage()

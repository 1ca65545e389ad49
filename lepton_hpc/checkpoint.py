"""Atomic, checksummed checkpoints written by rank 0, on branches that are never lost.

A checkpoint is an HDF5 file: parameters, optimiser state, the loop position (epoch, batch,
step), the training history, the meta data of the run (config, model spec, scaler, data
fingerprint, optimiser), its place in the directory's history, and a SHA-256 over all of it. It is
written through ``safety.atomic_file`` (temporary name, fsync, rename, fsync of the directory),
so a reader sees a whole checkpoint or none; a truncated or altered one fails its checksum.

Lineage: every checkpoint records a ``lineage`` id (random, made when a run starts fresh and kept
while it resumes from its own newest checkpoint), the ``parent`` it branched from (when it resumed
from an older checkpoint, or one from elsewhere) and a write sequence number ``seq``, one above
every checkpoint already in the directory. Files are named ``ckpt-<seq:08d>-<step:010d>.h5`` so
names never collide across lineages; ``ckpt-<step:010d>.h5`` files of format 1 are still read
(as seq 0, older than any named by seq).

- Rotation keeps the newest ``keep`` checkpoints of the current lineage, by ``seq``; it deletes
  only valid files of that lineage, never another lineage's, a damaged file, or any file whose
  name is not a checkpoint name.
- ``--resume auto`` takes the valid checkpoint with the highest ``seq``; when checkpoints exist
  but none is valid it is an error naming each file, not a fresh start.
- ``--resume PATH`` to an older checkpoint of the directory moves the checkpoints written after
  it into ``checkpoints/aside-<UTC time>-<lineage>/`` (renamed, never deleted), so a later
  ``--resume auto`` continues the branch the user chose.
- ``check_resume`` refuses a resume whose model, data, scaling, optimiser or step-defining
  settings differ from the checkpoint's, naming the first difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import LeptonError
from .log import Log
from .safety import atomic_file, fsync_dir, same_path

__all__ = [
    "FORMAT",
    "MAY_CHANGE",
    "PATTERN",
    "DamagedCheckpoint",
    "TrainState",
    "check_resume",
    "digest",
    "fsync_dir",
    "latest_valid",
    "new_lineage",
    "read_checkpoint",
    "resume_checkpoint",
    "set_aside_newer",
    "write_checkpoint",
]

FORMAT = 2  # 2: lineage, parent and seq; 1: none of them (still read)
PATTERN = "ckpt-*.h5"  # a glob for listing; only names matching _NAME are checkpoints
_NAME = re.compile(r"ckpt-(?:(?P<seq>\d{8,})-)?(?P<step>\d{10,})\.h5")
ASIDE = "aside-"

# Settings a resumed run may change: when and where it writes, how long it runs, the step size,
# where it runs. Everything else (model, optimiser and its other hyper-parameters, the data's
# content, data.x/y, scaling, validation split, nonfinite, seed, batch size, comm strategy,
# local steps, compression, reproducibility) defines the steps and must match the checkpoint.
MAY_CHANGE: tuple[str, ...] = (
    "train.epochs",
    "train.max_steps",
    "train.patience",
    "train.log_every",
    "train.threads",
    "train.device",
    "optim.lr",
    "model.max_classes",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.watchdog_s",
    "output.plot",
    "output.dir",
    "data.test",
    "comm.backend",
    "ranks",  # the rank count (a top-level meta key)
)


@dataclass(slots=True)
class TrainState:
    """Everything the loop needs to continue exactly where it stopped."""

    params: np.ndarray
    optimizer: dict[str, np.ndarray]
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimiser steps done in all
    epoch_loss: float = 0.0  # loss sum and rows of the epoch in progress
    epoch_rows: float = 0.0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # early stopping: metric, epoch, params
    meta: dict = field(default_factory=dict)  # config, model spec, scaler, data, optimiser
    lineage: str = ""  # the branch this state is on ("" until its first checkpoint)
    parent: dict = field(default_factory=dict)  # the checkpoint the branch started from
    seq: int = 0  # write sequence number of the checkpoint this state was read from or written as


class DamagedCheckpoint(LeptonError):
    """A checkpoint that cannot be read or fails its checksum; ``reason`` says which."""

    def __init__(self, path: Path, reason: str, detail: str = "") -> None:
        said = f"is {reason} ({detail})" if detail else reason
        super().__init__(f"checkpoint '{path}' {said}")
        self.path = Path(path)
        self.reason = f"{reason}: {detail}" if detail else reason


def new_lineage() -> str:
    """A fresh random lineage id (16 hex digits)."""
    return secrets.token_hex(8)


# ---- digest, shared with model.h5 -----------------------------------------------------------
def digest(arrays: dict[str, np.ndarray], attrs: dict) -> str:
    """SHA-256 over every array (name, dtype, shape, bytes; in name order) and the JSON of
    ``attrs`` (sorted keys): what checkpoints and ``model.h5`` store to detect damage."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    h.update(json.dumps(attrs, sort_keys=True).encode())
    return h.hexdigest()


def _flatten(state: TrainState) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {"params": state.params}
    arrays.update({f"optimizer/{k}": np.asarray(v) for k, v in state.optimizer.items()})
    if "params" in state.best:
        arrays["best/params"] = state.best["params"]
    best = {k: v for k, v in state.best.items() if k != "params"}
    attrs = {
        "format": FORMAT,
        "epoch": state.epoch,
        "batch": state.batch,
        "step": state.step,
        "epoch_loss": state.epoch_loss,
        "epoch_rows": state.epoch_rows,
        "history": state.history,
        "best": best,
        "meta": state.meta,
        "lineage": state.lineage,
        "parent": state.parent,
        "seq": state.seq,
    }
    # What is hashed is what a reader gets back: the JSON round trip of the attributes.
    return arrays, json.loads(json.dumps(attrs))


# ---- names and the directory ----------------------------------------------------------------
def _name(seq: int, step: int) -> str:
    return f"ckpt-{seq:08d}-{step:010d}.h5"


def _name_key(name: str) -> tuple[int, int] | None:
    """(seq, step) of a checkpoint file name (seq 0 for format-1 names), None for other names."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    return int(m["seq"] or 0), int(m["step"])


def _checkpoint_files(directory: Path) -> list[tuple[tuple[int, int], Path]]:
    """The checkpoint files of ``directory`` (plain files with checkpoint names), oldest first."""
    try:
        entries = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for p in entries:
        key = _name_key(p.name)
        if key is not None and not p.is_symlink() and p.is_file():
            found.append((key, p))
    return sorted(found)


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


# ---- writing, reading -------------------------------------------------------------------------
def write_checkpoint(directory: Path, state: TrainState, keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<seq>-<step>.h5`` and keep the newest ``keep`` of its
    lineage. A state without a lineage (a fresh run) gets one here; ``state.seq`` is set to
    the new file's sequence number (one above every checkpoint name in ``directory``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not state.lineage:
        state.lineage = new_lineage()
    files = _checkpoint_files(directory)
    before = state.seq
    seq = max([state.seq, *(key[0] for key, _ in files)]) + 1
    final = directory / _name(seq, state.step)
    while os.path.lexists(final):  # never replace a file (not even one seen as damaged)
        seq += 1
        final = directory / _name(seq, state.step)
    state.seq = seq
    try:
        arrays, attrs = _flatten(state)
        with atomic_file(final) as tmp, h5py.File(tmp, "w") as fh:
            for name, a in arrays.items():
                fh.create_dataset(name, data=a)
            fh.attrs["state"] = json.dumps(attrs)
            fh.attrs["sha256"] = digest(arrays, attrs)
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


def read_checkpoint(path: Path) -> TrainState:
    """Load a checkpoint and verify its checksum; raises ``DamagedCheckpoint`` (a
    ``LeptonError``) naming the file when it is missing, unreadable or fails its checksum."""
    path = Path(path)
    if not path.is_file():
        raise LeptonError(f"checkpoint '{path}' does not exist")
    try:
        with h5py.File(path, "r") as fh:
            arrays: dict[str, np.ndarray] = {}
            fh.visititems(
                lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
            attrs = json.loads(fh.attrs["state"])
            stored = fh.attrs["sha256"]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DamagedCheckpoint(path, "unreadable", str(exc)) from None
    if digest(arrays, attrs) != stored:
        raise DamagedCheckpoint(path, "fails its checksum")
    version = attrs.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise LeptonError(
            f"checkpoint '{path}' has format {version}, newer than this lepton reads ({FORMAT})"
        )
    try:
        optimizer = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
        best = dict(attrs["best"])
        if "best/params" in arrays:
            best["params"] = arrays["best/params"]
        return TrainState(
            arrays["params"],
            optimizer,
            epoch=attrs["epoch"],
            batch=attrs["batch"],
            step=attrs["step"],
            epoch_loss=attrs["epoch_loss"],
            epoch_rows=attrs["epoch_rows"],
            history=attrs["history"],
            best=best,
            meta=attrs["meta"],
            lineage=attrs.get("lineage", ""),
            parent=attrs.get("parent", {}),
            seq=attrs.get("seq", 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedCheckpoint(path, "unreadable", f"missing or bad field {exc}") from None


# ---- choosing where to resume ---------------------------------------------------------------
def latest_valid(directory: Path, log: Log) -> tuple[Path, TrainState] | None:
    """The valid checkpoint with the highest ``seq`` (``--resume auto``); None when there is no
    checkpoint at all. Damaged ones are skipped with one warning each; when checkpoints exist but
    none is valid, a ``LeptonError`` names each file and why."""
    files = _checkpoint_files(Path(directory))
    problems = []
    for _, path in reversed(files):
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as exc:
            log.warning(f"{exc}; trying the previous one")
            problems.append(f"{path.name} ({exc.reason})")
    if problems:
        raise LeptonError(
            f"checkpoints exist but none is valid: {', '.join(problems)} (in '{directory}'; "
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
    chosen = (state.seq, state.step)
    newer = [(k, p) for k, p in _checkpoint_files(directory) if k > chosen]
    newer = [(k, p) for k, p in newer if not same_path(p, path)]
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
    log.info(
        f"resuming from '{path}': moved the {len(moved)} checkpoint(s) written after it to "
        f"'{aside}': {names}"
    )
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


def resume_checkpoint(
    resume: str, directory: Path, meta: dict, log: Log
) -> tuple[Path, TrainState] | None:
    """The state ``--resume`` names, checked against this run's ``meta`` and put on its branch.

    ``auto``: the valid checkpoint of ``directory`` with the highest seq, continuing its lineage
    (None when there is no checkpoint at all). A PATH: that checkpoint; when it is an older one of
    ``directory``, the checkpoints written after it are moved aside (``set_aside_newer``) and a new
    lineage starts from it; from elsewhere, a new lineage starts from it and nothing moves.
    ``check_resume`` runs before anything is moved, so a refused resume changes no file. The
    returned state carries ``meta`` (the settings the resumed run writes with).
    """
    directory = Path(directory)
    if resume == "auto":
        found = latest_valid(directory, log)
        if found is None:
            return None
        path, state = found
        check_resume(state.meta, meta, path)
        if not state.lineage:  # a format-1 checkpoint: its files are never rotated away
            _branch(state, path)
    else:
        path = Path(resume)
        state = read_checkpoint(path)
        check_resume(state.meta, meta, path)
        moved = set_aside_newer(path, state, directory, log)
        if moved or not state.lineage or not same_path(path.parent, directory):
            _branch(state, path)
    state.meta = meta
    return path, state


# ---- what may differ on resume --------------------------------------------------------------
def _may_change_text() -> str:
    """MAY_CHANGE for a message, a section all of whose keys may change as ``section.*``."""
    from .config import SECTIONS

    out: list[str] = []
    for key in MAY_CHANGE:
        section = key.split(".", 1)[0]
        if section not in SECTIONS:
            item = "the rank count" if key == "ranks" else key
        elif all(
            f"{section}.{f.name}" in MAY_CHANGE for f in dataclasses.fields(SECTIONS[section])
        ):
            item = f"{section}.*"
        else:
            item = key
        if item not in out:
            out.append(item)
    return ", ".join(out)


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists), for comparing saved and new meta."""
    return json.loads(json.dumps(value, default=str))


def _refuse(path: Path, key: str, old: Any, new: Any) -> LeptonError:
    return LeptonError(
        f"checkpoint '{path}' was written with {key} = {old!r}; this run has {new!r} "
        f"(may change on resume: {_may_change_text()})"
    )


def _compare_data(old: dict, new: dict, path: Path) -> str | None:
    """One line naming how the data differ from the checkpoint's, or None."""
    from .data.fingerprint import compare_fingerprints

    return compare_fingerprints(old, new, f"checkpoint '{path}'")


def check_resume(saved_meta: dict, new_meta: dict, path: Path) -> None:
    """Refuse a resume whose settings would change what the steps compute.

    Raises ``LeptonError`` with one line naming the first difference between the checkpoint's
    ``saved_meta`` and this run's ``new_meta`` (``config``, ``data`` fingerprint, ``scaler``,
    ``n_features``, ``model`` spec, ``optimizer``). Settings that may change on resume (the
    module constant ``MAY_CHANGE``): train.epochs, train.max_steps, train.patience,
    train.log_every, train.threads, train.device, optim.lr, checkpoint.every_steps,
    checkpoint.keep, checkpoint.watchdog_s, output.plot, output.dir, data.test, comm.backend and
    the rank count. The data file may be moved: its content is compared (the fingerprint), its
    path only when a fingerprint is missing. Keys missing on either side (a checkpoint written by
    an older lepton) are not compared. Since the model and the optimiser must match, the
    optimiser state a resume loads always has the shapes and meaning that optimiser expects.
    """
    old, new = _plain(saved_meta or {}), _plain(new_meta or {})
    fingerprints = isinstance(old.get("data"), dict) and isinstance(new.get("data"), dict)
    old_cfg, new_cfg = old.get("config") or {}, new.get("config") or {}
    for section, values in old_cfg.items():
        if not isinstance(values, dict) or not isinstance(new_cfg.get(section), dict):
            continue
        for key, before in values.items():
            dotted = f"{section}.{key}"
            if dotted in MAY_CHANGE or key not in new_cfg[section]:
                continue
            if dotted == "data.train" and fingerprints:
                continue  # a moved file is the same data: its content is compared below
            if new_cfg[section][key] != before:
                raise _refuse(path, dotted, before, new_cfg[section][key])
    if fingerprints:
        diff = _compare_data(old["data"], new["data"], path)
        if diff:
            raise LeptonError(f"cannot resume: {diff}")
    for key, name in (("scaler", "data.scale"), ("n_features", "the feature count")):
        if key in old and key in new and old[key] != new[key]:
            raise _refuse(path, name, old[key], new[key])
    for key, prefix in (("model", "model "), ("optimizer", "optim.")):
        before, now = old.get(key), new.get(key)
        if not isinstance(before, dict) or not isinstance(now, dict):
            continue
        for k in before:
            if f"{prefix}{k}" in MAY_CHANGE or k == "lr" or k not in now:
                continue
            if before[k] != now[k]:
                raise _refuse(path, f"{prefix}{k}", before[k], now[k])

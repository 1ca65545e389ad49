"""Resuming: the state ``--resume`` names, and the check that its settings match this run's.

``check_resume`` refuses a resume whose model, data, scaling, optimiser or step-defining settings
differ from the checkpoint's, naming the first difference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import LeptonError
from ..log import Log
from ..safety import same_path
from .files import TrainState, read_checkpoint
from .lineage import _branch, latest_valid, move_aside, set_aside_newer

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
    "checkpoint.mirror",
    "output.plot",
    "output.dir",
    "data.test",
    "comm.backend",
    "model.parallel",  # the checkpoint holds the full model whatever the grid
    "comm.tensor_ranks",
    "ranks",  # the rank count (a top-level meta key)
)


def resume_checkpoint(
    resume: str, directory: Path, meta: dict, log: Log, mirror: Path | None = None
) -> tuple[Path, TrainState] | None:
    """The state ``--resume`` names, checked against this run's ``meta`` and put on its branch.

    ``auto``: the valid checkpoint of ``directory`` with the highest seq, continuing its lineage
    (None when there is no checkpoint at all). A PATH: that checkpoint; when it is an older one of
    ``directory``, the checkpoints written after it are moved aside (``set_aside_newer``) and a new
    lineage starts from it; from elsewhere, a new lineage starts from it and nothing moves.
    ``check_resume`` runs before anything is moved, so a refused resume changes no file. The
    returned state carries ``meta`` (the settings the resumed run writes with).

    ``mirror``: the run's directory in the checkpoint mirror. ``auto`` then takes the newest valid
    checkpoint of either directory; a PATH in either sets aside the later checkpoints of both.
    """
    directory = Path(directory)
    mirrors = [Path(mirror)] if mirror is not None else []
    if resume == "auto":
        found = latest_valid(directory, log, *mirrors)
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
        if any(same_path(path.parent, d) for d in (directory, *mirrors)):
            # a checkpoint of this run: the later ones go aside in the primary and the mirror
            primary = [] if same_path(path.parent, directory) else [directory]
            for d in [*primary, *mirrors]:
                if d.is_dir():
                    moved += move_aside(d, (state.seq, state.step), path, log)
        if moved or not state.lineage or not same_path(path.parent, directory):
            _branch(state, path)
    state.meta = meta
    return path, state


# ---- what may differ on resume --------------------------------------------------------------
def _may_change_text() -> str:
    """MAY_CHANGE for a message, a section all of whose keys may change as ``section.*``."""
    from ..config import SECTIONS

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
    from ..data.fingerprint import compare_fingerprints

    return compare_fingerprints(old, new, f"checkpoint '{path}'")


def check_resume(saved_meta: dict, new_meta: dict, path: Path) -> None:
    """Refuse a resume whose settings would change what the steps compute.

    Raises ``LeptonError`` with one line naming the first difference between the checkpoint's
    ``saved_meta`` and this run's ``new_meta`` (``config``, ``data`` fingerprint, ``scaler``,
    ``n_features``, ``model`` spec, ``optimizer``). Settings that may change on resume (the
    module constant ``MAY_CHANGE``): train.epochs, train.max_steps, train.patience,
    train.log_every, train.threads, train.device, optim.lr, checkpoint.every_steps,
    checkpoint.keep, checkpoint.watchdog_s, checkpoint.mirror, output.plot, output.dir,
    data.test, comm.backend, model.parallel, comm.tensor_ranks and the rank count (the
    checkpoint holds the full model whatever the grid). The data file may be moved: its content is
    compared (the fingerprint), its path only when a fingerprint is missing. Keys missing on
    either side (a checkpoint written by an older lepton) are not compared. Since the model and
    the optimiser must match, the optimiser state a resume loads always has the shapes and
    meaning that optimiser expects.
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

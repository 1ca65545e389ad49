"""Checkpoint files: the training state, its HDF5 layout, names and checksum.

A checkpoint is an HDF5 file: parameters, optimiser state, the loop position (epoch, batch,
step), the training history, the meta data of the run (config, model spec, scaler, data
fingerprint, optimiser), its place in the directory's history, and a SHA-256 over all of it. It is
written through ``safety.atomic_file`` (temporary name, fsync, rename, fsync of the directory),
so a reader sees a whole checkpoint or none; a truncated or altered one fails its checksum.

Files are named ``ckpt-<seq:08d>-<step:010d>.h5`` so names never collide across lineages;
``ckpt-<step:010d>.h5`` files of format 1 are still read (as seq 0, older than any named by seq).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import LeptonError
from ..safety import atomic_file

FORMAT = 2  # 2: lineage, parent and seq; 1: none of them (still read)
PATTERN = "ckpt-*.h5"  # a glob for listing; only names matching _NAME are checkpoints
_NAME = re.compile(r"ckpt-(?:(?P<seq>\d{8,})-)?(?P<step>\d{10,})\.h5")


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


def _write(final: Path, state: TrainState) -> None:
    """Write ``state`` to ``final`` atomically (a whole checkpoint under that name, or none)."""
    arrays, attrs = _flatten(state)
    with atomic_file(final) as tmp, h5py.File(tmp, "w") as fh:
        for name, a in arrays.items():
            fh.create_dataset(name, data=a)
        fh.attrs["state"] = json.dumps(attrs)
        fh.attrs["sha256"] = digest(arrays, attrs)


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

"""Atomic, checksummed checkpoints written by rank 0, and finding the newest good one.

A checkpoint is an HDF5 file: parameters, optimiser state, the loop position (epoch, batch,
step), the training history, the config, the model spec and the scaler, plus a SHA-256 over all of
it. It is written to a temporary name, fsynced, then renamed, so a reader sees a whole
checkpoint or none; a truncated or corrupted one fails its checksum and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import LeptonError
from .log import Log

FORMAT = 1
PATTERN = "ckpt-*.h5"


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
    meta: dict = field(default_factory=dict)  # config, model spec, scaler, rank count


def _digest(arrays: dict[str, np.ndarray], attrs: dict) -> str:
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
    }
    return arrays, attrs


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(directory: Path, state: TrainState, keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<step>.h5`` and keep only the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays, attrs = _flatten(state)
    final = directory / f"ckpt-{state.step:010d}.h5"
    tmp = directory / f".{final.name}.tmp"
    with h5py.File(tmp, "w") as fh:
        for name, a in arrays.items():
            fh.create_dataset(name, data=a)
        fh.attrs["state"] = json.dumps(attrs)
        fh.attrs["sha256"] = _digest(arrays, attrs)
    with tmp.open("rb+") as raw:
        os.fsync(raw.fileno())
    tmp.replace(final)
    fsync_dir(directory)
    for old in sorted(directory.glob(PATTERN))[:-keep]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path) -> TrainState:
    """Load a checkpoint and verify its checksum; raises ``LeptonError`` when it is damaged."""
    try:
        with h5py.File(path, "r") as fh:
            arrays: dict[str, np.ndarray] = {}
            fh.visititems(
                lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
            attrs = json.loads(fh.attrs["state"])
            digest = fh.attrs["sha256"]
    except (OSError, KeyError, ValueError) as exc:
        raise LeptonError(f"checkpoint '{path}' is unreadable ({exc})") from None
    if _digest(arrays, attrs) != digest:
        raise LeptonError(f"checkpoint '{path}' fails its checksum")
    optimizer = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    best = dict(attrs["best"])
    if "best/params" in arrays:
        best["params"] = arrays["best/params"]
    return TrainState(
        arrays["params"],
        optimizer,
        attrs["epoch"],
        attrs["batch"],
        attrs["step"],
        attrs["epoch_loss"],
        attrs["epoch_rows"],
        attrs["history"],
        best,
        attrs["meta"],
    )


def latest_valid(directory: Path, log: Log) -> tuple[Path, TrainState] | None:
    """The newest checkpoint that passes its checksum; damaged ones are skipped with a warning."""
    for path in sorted(directory.glob(PATTERN), reverse=True):
        try:
            return path, read_checkpoint(path)
        except LeptonError as exc:
            log.warning(f"{exc}; trying the previous one")
    return None

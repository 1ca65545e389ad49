"""Shared by the checkpoint unit tests: small training states, runs writing checkpoints, a
format-1 checkpoint as an older lepton wrote it, and ways to damage a file."""

import json

import h5py
import numpy as np

from lepton_hpc.checkpoint import TrainState, digest, write_checkpoint

LINEAGE = "a1" * 8


def state(step, lineage=LINEAGE, meta=None):
    rng = np.random.default_rng(step)
    return TrainState(
        rng.normal(size=7),
        {"t": np.array(step), "m": rng.normal(size=7)},
        epoch=step // 3,
        batch=step % 3,
        step=step,
        epoch_loss=0.25,
        epoch_rows=10.0,
        history=[{"epoch": 1, "loss": 0.5}],
        best={"value": 0.1, "epoch": 1, "params": np.ones(7)},
        meta=meta if meta is not None else {"model": {"kind": "linear"}},
        lineage=lineage,
    )


def run_of(directory, steps, lineage=LINEAGE, keep=100):
    """One run writing a checkpoint at each of ``steps`` (one state, as the trainer does)."""
    s = state(steps[0], lineage)
    paths = []
    for step in steps:
        s.step = step
        s.params = np.full(7, float(step))
        paths.append(write_checkpoint(directory, s, keep=keep))
    return s, paths


def names(directory):
    return sorted(p.name for p in directory.glob("ckpt-*.h5"))


def write_format1(path, s):
    """A checkpoint as lepton wrote it before lineages: format 1, named by step."""
    arrays = {"params": s.params, **{f"optimizer/{k}": v for k, v in s.optimizer.items()}}
    attrs = {
        "format": 1,
        "epoch": s.epoch,
        "batch": s.batch,
        "step": s.step,
        "epoch_loss": s.epoch_loss,
        "epoch_rows": s.epoch_rows,
        "history": s.history,
        "best": {},
        "meta": s.meta,
    }
    with h5py.File(path, "w") as fh:
        for name, a in arrays.items():
            fh.create_dataset(name, data=a)
        fh.attrs["state"] = json.dumps(attrs)
        fh.attrs["sha256"] = digest(arrays, attrs)
    return path


def flip_param(path):
    with h5py.File(path, "r+") as fh:
        fh["params"][0] += 1.0


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

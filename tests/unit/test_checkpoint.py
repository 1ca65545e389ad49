"""Checkpoints: round trip, checksum, keep-K, and falling back past a damaged one."""

import numpy as np
import pytest

from lepton_hpc.checkpoint import TrainState, latest_valid, read_checkpoint, write_checkpoint
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log


def state(step):
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
        meta={"model": {"kind": "linear"}},
    )


def test_round_trip(tmp_path):
    s = state(4)
    path = write_checkpoint(tmp_path, s, keep=3)
    r = read_checkpoint(path)
    assert np.array_equal(r.params, s.params) and r.params.dtype == np.float64
    assert np.array_equal(r.optimizer["m"], s.optimizer["m"]) and int(r.optimizer["t"]) == 4
    assert (r.epoch, r.batch, r.step) == (1, 1, 4)
    assert r.history == s.history and r.meta == s.meta
    assert np.array_equal(r.best["params"], np.ones(7)) and r.best["epoch"] == 1


def test_keeps_the_newest(tmp_path):
    for step in range(1, 7):
        write_checkpoint(tmp_path, state(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.h5")) == [
        "ckpt-0000000005.h5",
        "ckpt-0000000006.h5",
    ]
    assert not list(tmp_path.glob(".*tmp"))


def test_truncated_newest_falls_back(tmp_path, capsys):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, state(step), keep=3)
    newest = tmp_path / "ckpt-0000000003.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(LeptonError):
        read_checkpoint(newest)
    path, s = latest_valid(tmp_path, Log())
    assert path.name == "ckpt-0000000002.h5" and s.step == 2
    assert "ckpt-0000000003.h5" in capsys.readouterr().err


def test_flipped_byte_fails_checksum(tmp_path):
    import h5py

    path = write_checkpoint(tmp_path, state(1), keep=3)
    with h5py.File(path, "r+") as fh:
        fh["params"][0] += 1.0
    with pytest.raises(LeptonError, match="checksum"):
        read_checkpoint(path)
    assert latest_valid(tmp_path, Log()) is None

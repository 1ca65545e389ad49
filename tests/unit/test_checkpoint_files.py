"""Checkpoint files (``lepton_hpc.checkpoint.files``): round trip, checksum, names, and the
names the package exports."""

import numpy as np
import pytest

import lepton_hpc.checkpoint as ck
from lepton_hpc.checkpoint import read_checkpoint, write_checkpoint
from lepton_hpc.checkpoint.files import _name, _name_key
from lepton_hpc.errors import LeptonError
from tests.unit.checkpoint_helpers import LINEAGE, flip_param, state


def test_round_trip(tmp_path):
    s = state(4)
    path = write_checkpoint(tmp_path, s, keep=3)
    assert path.name == "ckpt-00000001-0000000004.h5"
    r = read_checkpoint(path)
    assert np.array_equal(r.params, s.params) and r.params.dtype == np.float64
    assert np.array_equal(r.optimizer["m"], s.optimizer["m"]) and int(r.optimizer["t"]) == 4
    assert (r.epoch, r.batch, r.step) == (1, 1, 4)
    assert r.history == s.history and r.meta == s.meta
    assert np.array_equal(r.best["params"], np.ones(7)) and r.best["epoch"] == 1
    assert (r.lineage, r.seq, r.parent) == (LINEAGE, 1, {})


def test_flipped_byte_fails_checksum(tmp_path):
    path = write_checkpoint(tmp_path, state(1), keep=3)
    flip_param(path)
    with pytest.raises(LeptonError, match="fails its checksum"):
        read_checkpoint(path)


def test_names_order_by_seq_then_step_and_read_format1():
    assert _name(3, 42) == "ckpt-00000003-0000000042.h5"
    assert _name_key(_name(3, 42)) == (3, 42)
    assert _name_key("ckpt-0000000042.h5") == (0, 42)  # format 1: older than any seq
    assert _name_key(_name(10**8, 1)) == (10**8, 1)
    for other in ("ckpt-mine.h5", "ckpt-42.h5", "ckpt-00000003-0000000042.h5.tmp"):
        assert _name_key(other) is None


def test_the_package_exports_what_callers_import():
    for name in (
        "MAY_CHANGE",
        "TrainState",
        "DamagedCheckpoint",
        "check_resume",
        "digest",
        "latest_valid",
        "read_checkpoint",
        "resume_checkpoint",
        "set_aside_newer",
        "write_checkpoint",
    ):
        assert name in ck.__all__ and getattr(ck, name) is not None

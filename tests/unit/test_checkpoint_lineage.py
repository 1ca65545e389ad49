"""Checkpoint lineages (``lepton_hpc.checkpoint.lineage``): rotation that never loses a branch,
``--resume auto``'s choice of the newest valid checkpoint, damaged files kept and named."""

import re

import pytest

from lepton_hpc.checkpoint import latest_valid, read_checkpoint, resume_checkpoint, write_checkpoint
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log
from tests.unit.checkpoint_helpers import (
    flip_param,
    names,
    run_of,
    state,
    truncate,
    write_format1,
)


def test_fresh_state_gets_a_lineage_and_keeps_it(tmp_path):
    s = state(1, lineage="")
    write_checkpoint(tmp_path, s, keep=3)
    assert re.fullmatch(r"[0-9a-f]{16}", s.lineage)
    first = s.lineage
    s.step = 2
    path = write_checkpoint(tmp_path, s, keep=3)
    assert read_checkpoint(path).lineage == first and s.seq == 2


def test_keeps_the_newest(tmp_path):
    run_of(tmp_path, range(1, 7), keep=2)
    assert names(tmp_path) == ["ckpt-00000005-0000000005.h5", "ckpt-00000006-0000000006.h5"]
    assert not list(tmp_path.glob(".*tmp"))


def test_truncated_newest_falls_back(tmp_path, capsys):
    _, paths = run_of(tmp_path, [1, 2, 3], keep=3)
    truncate(paths[2])
    with pytest.raises(LeptonError, match="unreadable"):
        read_checkpoint(paths[2])
    path, s = latest_valid(tmp_path, Log())
    assert path == paths[1] and s.step == 2
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and paths[2].name in err


def test_stale_higher_numbered_checkpoint_of_another_lineage_survives(tmp_path):
    _, (stale,) = run_of(tmp_path, [1000], lineage="b2" * 8)  # an abandoned branch, far ahead
    legacy = write_format1(tmp_path / "ckpt-0000005000.h5", state(5000))  # older lepton's
    before = {p: p.read_bytes() for p in (stale, legacy)}
    s, paths = run_of(tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert {p: p.read_bytes() for p in (stale, legacy)} == before
    assert names(tmp_path) == sorted(
        [legacy.name, stale.name, "ckpt-00000005-0000000004.h5", "ckpt-00000006-0000000005.h5"]
    )
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    path, newest = latest_valid(tmp_path, Log())
    assert path == paths[-1] and newest.step == 5 and newest.seq == s.seq == 6


def test_damaged_higher_numbered_file_does_not_make_new_checkpoints_vanish(tmp_path, capsys):
    damaged = tmp_path / "ckpt-00000900-0000009000.h5"
    damaged.write_bytes(b"\x89HDF\r\n garbage")
    old_style = tmp_path / "ckpt-9999999999.h5"
    old_style.write_bytes(b"not hdf5")
    mine = tmp_path / "ckpt-mine.h5"  # not a checkpoint name: never touched nor read
    mine.write_bytes(b"my own file")
    _, paths = run_of(tmp_path, [1, 2, 3], keep=2)
    assert damaged.read_bytes() == b"\x89HDF\r\n garbage"
    assert old_style.read_bytes() == b"not hdf5" and mine.read_bytes() == b"my own file"
    assert [p.exists() for p in paths] == [False, True, True]
    assert [p.name for p in paths] == [
        "ckpt-00000901-0000000001.h5",
        "ckpt-00000902-0000000002.h5",
        "ckpt-00000903-0000000003.h5",
    ]
    capsys.readouterr()
    path, newest = latest_valid(tmp_path, Log())
    assert path == paths[-1] and newest.step == 3
    assert capsys.readouterr().err == ""  # the valid newest comes first: nothing to skip


def test_a_damaged_file_of_the_lineage_is_never_deleted(tmp_path):
    _, paths = run_of(tmp_path, [1, 2], keep=2)
    flip_param(paths[0])
    before = paths[0].read_bytes()
    run_of(tmp_path, [3, 4, 5], keep=2)
    assert paths[0].read_bytes() == before
    assert not paths[1].exists()  # valid and of the lineage: rotated away


def test_only_damaged_checkpoints_is_an_error_naming_each(tmp_path, capsys):
    _, (a, b) = run_of(tmp_path, [1, 2])
    flip_param(a)
    truncate(b)
    with pytest.raises(LeptonError) as err:
        latest_valid(tmp_path, Log())
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoints exist but none is valid: {b.name} (unreadable: ")
    assert f"{a.name} (fails its checksum)" in msg and str(tmp_path) in msg
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and a.name in warnings[1] and b.name in warnings[0]


def test_no_checkpoint_at_all_is_none(tmp_path):
    (tmp_path / "ckpt-notes.h5").write_bytes(b"x")
    assert latest_valid(tmp_path, Log()) is None
    assert latest_valid(tmp_path / "missing", Log()) is None
    assert resume_checkpoint("auto", tmp_path, {}, Log()) is None


def test_highest_seq_wins_over_highest_name(tmp_path):
    """seq 10**8 sorts before seq 99999999 by name; by seq it is the newer."""
    s = state(7)
    s.seq = 99_999_998
    first = write_checkpoint(tmp_path, s, keep=5)
    s.step = 3
    second = write_checkpoint(tmp_path, s, keep=5)
    assert first.name == "ckpt-99999999-0000000007.h5"
    assert second.name == "ckpt-100000000-0000000003.h5" and second.name < first.name
    assert latest_valid(tmp_path, Log())[0] == second

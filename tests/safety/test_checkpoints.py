"""Checkpoints never lose a branch and a resume refuses the wrong state, in real ``lepton train``
runs: a resume with another optimiser, scaling, model or data is one clear error that changes no
file; stale and damaged checkpoints are never deleted and never make new ones vanish; only
damaged checkpoints is an error naming each; ``--resume PATH`` to an older checkpoint moves the
newer ones aside (bytes unchanged) and continues exactly."""

import re
import shutil

import h5py
import numpy as np
import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import datagen, lepton, ok, read_params, write_config
from tests.resume_checks import check_resumed, newest_valid
from tests.safety.conftest import assert_unchanged, check_failure, leftover_temporaries, snapshot

RANKS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("ckpt") / "train.h5", 400, 4, seed=3)


def config(tmp_path, data, run, name="c", **extra):
    base = {
        "data": {"train": str(data)},
        "model": {"kind": "logistic"},
        "optim": {"name": "adam", "lr": 0.05},
        "train": {"epochs": 2, "batch_size": 64},
        "output": {"dir": str(run), "plot": False},
    }
    for key, body in extra.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / f"{name}.toml", base)


def ckpts(run):
    return sorted((run / "checkpoints").glob("ckpt-*.h5"))


def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, data):
    run = tmp_path / "run"
    cfg = config(tmp_path, data, run, train={"batch_size": 0})  # full batch: lbfgs may be asked
    ok(lepton(RANKS, "train", cfg, timeout=120))
    newest = ckpts(run)[-1]
    other = tmp_path / "other.h5"  # same shape and types, other rows
    datagen(other, 400, 4, seed=4)
    outputs = [run / "checkpoints", run / "model.h5", run / "results.json", run / "status.json"]
    before = snapshot(*outputs)
    for override, needles in [
        ("optim.name=momentum", ["optim.name = 'adam'; this run has 'momentum'"]),
        ("optim.name=lbfgs", ["optim.name = 'adam'; this run has 'lbfgs'"]),
        ("data.scale=zscore", ["data.scale = 'none'; this run has 'zscore'"]),
        ("model.kind=linear", ["model.kind = 'logistic'; this run has 'linear'"]),
        (f"data.train={other}", [f"'{other}:X'", "rows differ"]),
    ]:
        res = lepton(RANKS, "train", cfg, "--resume", "auto", override, timeout=120)
        where = [] if override.startswith("data.train") else [f"checkpoint '{newest}'"]
        check_failure(res, 2, *where, *needles)
        assert_unchanged(before, *outputs)
    # what may change on resume does: more epochs, another step size
    state = read_checkpoint(newest)
    res = ok(lepton(RANKS, "train", cfg, "--resume", "auto", "train.epochs=3", "optim.lr=0.01"))
    check_resumed(res.stdout, run, newest, state)
    assert read_checkpoint(ckpts(run)[-1]).epoch == 3


def test_stale_and_damaged_checkpoints_survive_and_resume_continues(tmp_path, data):
    other = tmp_path / "other"
    ok(lepton(RANKS, "train", config(tmp_path, data, other, name="o"), timeout=120))
    run = tmp_path / "run"
    cfg = config(tmp_path, data, run, checkpoint={"keep": 2})
    ok(lepton(RANKS, "train", cfg, timeout=120))
    own = ckpts(run)
    lineage = read_checkpoint(own[-1]).lineage
    stale = run / "checkpoints" / "ckpt-0000999999.h5"  # an older lepton's name, far ahead
    shutil.copy(ckpts(other)[-1], stale)
    damaged = run / "checkpoints" / "ckpt-00000090-0000000090.h5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n not a checkpoint")
    planted = snapshot(stale, damaged)
    path, state = newest_valid(run / "checkpoints")
    assert path == own[-1]
    res = ok(lepton(RANKS, "train", cfg, "--resume", "auto", "train.epochs=4", timeout=120))
    check_resumed(res.stdout, run, path, state)
    assert damaged.name in res.stderr and "trying the previous one" in res.stderr
    assert_unchanged(planted, stale, damaged)
    new = [p for p in ckpts(run) if p not in (stale, damaged)]
    assert [p.name[:14] for p in new] == ["ckpt-00000091-", "ckpt-00000092-"]
    states = [read_checkpoint(p) for p in new]
    assert [s.epoch for s in states] == [3, 4]
    assert {s.lineage for s in states} == {lineage}  # resume auto continues the branch
    assert not any(p.exists() for p in own)  # the run's own older ones rotated away
    assert not leftover_temporaries(run)


def test_only_damaged_checkpoints_is_an_error_naming_each(tmp_path, data):
    run = tmp_path / "run"
    cfg = config(tmp_path, data, run)
    ok(lepton(RANKS, "train", cfg, timeout=120))
    first, second = ckpts(run)
    with h5py.File(first, "r+") as fh:
        fh["params"][0] += 1.0
    second.write_bytes(second.read_bytes()[:1000])
    before = snapshot(run / "checkpoints")
    res = lepton(RANKS, "train", cfg, "--resume", "auto", "train.epochs=3", timeout=120)
    check_failure(
        res,
        2,
        "checkpoints exist but none is valid",
        f"{first.name} (fails its checksum)",
        f"{second.name} (unreadable: ",
    )
    assert "starting a new run" not in res.stdout
    assert_unchanged(before, run / "checkpoints")


def test_resume_from_an_older_checkpoint_sets_the_newer_aside_and_is_exact(tmp_path, data):
    run = tmp_path / "run"
    cfg = config(tmp_path, data, run, train={"epochs": 4}, checkpoint={"keep": 10})
    ok(lepton(RANKS, "train", cfg, timeout=120))
    reference = read_params(run / "model.h5")
    first = ckpts(run)
    assert len(first) == 4
    newer = {p.name: p.read_bytes() for p in first[2:]}
    chosen = read_checkpoint(first[1])
    res = ok(lepton(RANKS, "train", cfg, "--resume", first[1], timeout=120))
    check_resumed(res.stdout, run, first[1], chosen)
    (aside,) = (run / "checkpoints").glob("aside-*")
    assert re.fullmatch(r"aside-\d{8}T\d{6}Z-[0-9a-f]{16}", aside.name)
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == newer  # moved, not rewritten
    assert str(aside) in res.stdout and all(name in res.stdout for name in newer)
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit
    branch = [p for p in ckpts(run) if p not in first[:2]]
    assert [read_checkpoint(p).epoch for p in branch] == [3, 4]
    assert read_checkpoint(branch[-1]).parent["file"] == str(first[1])
    assert all(p.exists() for p in first[:2])
    # a later --resume auto continues the chosen branch, not the set-aside one
    assert newest_valid(run / "checkpoints")[0] == branch[-1]
    last = read_checkpoint(branch[-1])
    res = ok(lepton(RANKS, "train", cfg, "--resume", "auto", "train.epochs=5", timeout=120))
    check_resumed(res.stdout, run, branch[-1], last)
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == newer

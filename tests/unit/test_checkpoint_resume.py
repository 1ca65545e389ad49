"""Resuming (``lepton_hpc.checkpoint.resume``): ``--resume auto`` and PATH put the state on its
branch, and the compatibility check refuses settings that change what the steps compute."""

import re
import shutil

import h5py
import numpy as np
import pytest

from lepton_hpc.checkpoint import (
    MAY_CHANGE,
    check_resume,
    latest_valid,
    resume_checkpoint,
    write_checkpoint,
)
from lepton_hpc.checkpoint import lineage as ck_lineage
from lepton_hpc.config import Config
from lepton_hpc.data.fingerprint import fingerprint
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log
from tests.unit.checkpoint_helpers import LINEAGE, names, run_of, state, write_format1


def test_resume_auto_continues_the_lineage(tmp_path):
    run_of(tmp_path, [1, 2, 3], keep=2)
    ck_lineage._KNOWN.clear()  # a new process: rotation verifies the files it finds
    _, s = resume_checkpoint("auto", tmp_path, {"model": {"kind": "linear"}}, Log())
    assert s.step == 3 and s.lineage == LINEAGE and s.parent == {}
    s.step = 4
    write_checkpoint(tmp_path, s, keep=2)
    assert names(tmp_path) == ["ckpt-00000003-0000000003.h5", "ckpt-00000004-0000000004.h5"]


def test_resume_path_to_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, capsys):
    meta = {"model": {"kind": "linear"}}
    _, paths = run_of(tmp_path, [1, 2, 3, 4])
    newer = {p.name: p.read_bytes() for p in paths[2:]}
    path, s = resume_checkpoint(str(paths[1]), tmp_path, meta, Log())
    assert path == paths[1] and s.step == 2
    (aside,) = tmp_path.glob("aside-*")
    assert re.fullmatch(rf"aside-\d{{8}}T\d{{6}}Z-{LINEAGE}", aside.name)
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == newer  # moved, bytes unchanged
    assert names(tmp_path) == [paths[0].name, paths[1].name]
    out = capsys.readouterr().out
    assert str(paths[1]) in out and all(name in out for name in newer)
    # the chosen branch is a new lineage whose parent is the checkpoint resumed from
    assert s.lineage != LINEAGE
    assert s.parent == {"lineage": LINEAGE, "seq": 2, "step": 2, "file": str(paths[1])}
    s.step = 3
    s.params = np.full(7, -3.0)
    branch = write_checkpoint(tmp_path, s, keep=1)
    assert branch.name == "ckpt-00000003-0000000003.h5"
    assert paths[0].exists() and paths[1].exists()  # another lineage's: kept
    found, again = latest_valid(tmp_path, Log())
    assert found == branch and np.array_equal(again.params, np.full(7, -3.0))
    assert again.lineage == s.lineage and again.parent["seq"] == 2
    _, later = resume_checkpoint("auto", tmp_path, meta, Log())
    assert later.lineage == s.lineage and later.step == 3  # the chosen branch, not the old one
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == newer


def test_resume_path_to_the_newest_moves_nothing(tmp_path):
    _, paths = run_of(tmp_path, [1, 2])
    _, s = resume_checkpoint(str(paths[1]), tmp_path, {}, Log())
    assert not list(tmp_path.glob("aside-*")) and s.lineage == LINEAGE


def test_resume_path_outside_the_directory_moves_nothing(tmp_path):
    run = tmp_path / "run"
    _, paths = run_of(run, [1, 2, 3])
    elsewhere = tmp_path / "elsewhere.h5"
    shutil.copy(paths[0], elsewhere)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    path, s = resume_checkpoint(str(elsewhere), run, {}, Log())
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert path == elsewhere and s.step == 1 and s.lineage != LINEAGE
    assert s.parent["file"] == str(elsewhere) and s.parent["lineage"] == LINEAGE
    s.step = 2
    new = write_checkpoint(run, s, keep=1)
    assert new.name == "ckpt-00000004-0000000002.h5"  # above every seq in the directory
    assert latest_valid(run, Log())[0] == new and all(p.exists() for p in paths)


def test_refused_resume_moves_nothing(tmp_path):
    meta = {"config": {"optim": {"name": "adam"}}}
    s = state(1, meta=meta)
    paths = [write_checkpoint(tmp_path, s, keep=5)]
    s.step = 2
    paths.append(write_checkpoint(tmp_path, s, keep=5))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = {"config": {"optim": {"name": "sgd"}}}
    with pytest.raises(LeptonError, match=r"optim\.name = 'adam'; this run has 'sgd'"):
        resume_checkpoint(str(paths[0]), tmp_path, other, Log())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_from_a_format1_checkpoint_starts_a_lineage(tmp_path):
    legacy = write_format1(tmp_path / "ckpt-0000000004.h5", state(4))
    path, s = resume_checkpoint("auto", tmp_path, {}, Log())
    assert path == legacy and s.seq == 0 and s.parent["file"] == str(legacy)
    assert re.fullmatch(r"[0-9a-f]{16}", s.lineage)
    s.step = 5
    written = write_checkpoint(tmp_path, s, keep=1)
    s.step = 6
    write_checkpoint(tmp_path, s, keep=1)
    assert legacy.exists() and not written.exists()
    assert latest_valid(tmp_path, Log())[1].step == 6


def test_resume_replaces_the_meta(tmp_path):
    write_checkpoint(tmp_path, state(1, meta={"config": {"train": {"epochs": 1}}}), keep=1)
    new = {"config": {"train": {"epochs": 9}}}
    assert resume_checkpoint("auto", tmp_path, new, Log())[1].meta == new


def meta_of(cfg=None, **changes):
    cfg = cfg or Config()
    d = cfg.to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        d[section][key] = value
    optim = d["optim"]
    return {
        "config": d,
        "model": {"kind": d["model"]["kind"], "sizes": [3, 1], "activation": "relu", "head": "x"},
        "ranks": 2,
        "scaler": d["data"]["scale"],
        "n_features": 3,
        "data": {"shape_x": [10, 3], "dtype_x": "float64", "sample_sha256": "0" * 64},
        "optimizer": {k: v for k, v in optim.items() if k != "lr"},
    }


def refusal(old, new):
    with pytest.raises(LeptonError) as err:
        check_resume(old, new, "run/checkpoints/ckpt-1.h5")
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("other", ["momentum", "lbfgs"])
def test_check_resume_refuses_another_optimizer(other):
    msg = refusal(meta_of(), meta_of(optim__name=other))
    assert msg.startswith(
        "checkpoint 'run/checkpoints/ckpt-1.h5' was written with optim.name = 'adam'; "
        f"this run has '{other}' (may change on resume: "
    )
    for key in ("train.epochs", "train.max_steps", "optim.lr", "checkpoint.*", "data.test"):
        assert key in msg


def test_check_resume_refuses_other_optimizer_settings():
    assert "optim.beta2 = 0.999; this run has 0.99" in refusal(
        meta_of(), meta_of(optim__beta2=0.99)
    )
    old, new = meta_of(), meta_of()
    new["optimizer"]["momentum"] = 0.5
    del old["config"], new["config"]  # only the optimiser identity is there to compare
    assert "optim.momentum = 0.9; this run has 0.5" in refusal(old, new)


def test_check_resume_refuses_another_model():
    msg = refusal(meta_of(), meta_of(model__kind="linear"))
    assert "model.kind = 'logistic'; this run has 'linear'" in msg
    old, new = meta_of(), meta_of()
    new["model"]["sizes"] = [3, 8, 1]
    assert "model sizes = [3, 1]; this run has [3, 8, 1]" in refusal(old, new)


def test_check_resume_refuses_other_data(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, seed in ((a, 0), (b, 1)):
        with h5py.File(path, "w") as fh:
            fh["X"] = np.random.default_rng(seed).normal(size=(50, 3))
            fh["y"] = np.zeros(50)
    old, new = meta_of(), meta_of()
    old["data"], new["data"] = fingerprint(str(a), "X", "y"), fingerprint(str(b), "X", "y")
    msg = refusal(old, new)
    assert msg.startswith("cannot resume: ") and f"'{b}:X'" in msg and "rows differ" in msg
    # the same content under another name (a moved file) resumes
    moved = tmp_path / "moved.h5"
    shutil.copy(a, moved)
    new = meta_of(data__train=str(moved))
    old["data"], new["data"] = fingerprint(str(a), "X", "y"), fingerprint(str(moved), "X", "y")
    check_resume(old, new, "p")
    assert "data.x = 'X'; this run has 'features'" in refusal(
        meta_of(), meta_of(data__x="features")
    )


def test_check_resume_refuses_another_scaling():
    msg = refusal(meta_of(), meta_of(data__scale="zscore"))
    assert "data.scale = 'none'; this run has 'zscore'" in msg


@pytest.mark.parametrize(
    "change",
    [
        {"data__validation_fraction": 0.2},
        {"train__seed": 7},
        {"train__batch_size": 16},
        {"data__nonfinite": "drop"},
        {"comm__strategy": "local_sgd"},
        {"comm__compression": "fp16"},
        {"comm__reproducible": True},
    ],
)
def test_check_resume_refuses_what_defines_the_steps(change):
    ((key, value),) = change.items()
    assert f"{key.replace('__', '.')} = " in refusal(meta_of(), meta_of(**change))
    assert f"this run has {value!r}" in refusal(meta_of(), meta_of(**change))


def test_check_resume_accepts_what_may_change():
    old = meta_of()
    new = meta_of(
        train__epochs=99,
        train__max_steps=5,
        train__patience=3,
        train__log_every=4,
        train__threads=2,
        train__device="auto",
        optim__lr=0.5,
        checkpoint__every_steps=7,
        checkpoint__keep=1,
        checkpoint__watchdog_s=9.0,
        output__plot=False,
        output__dir="elsewhere",
        data__test="test.h5",
        comm__backend="horovod",
    )
    new["ranks"] = 5
    check_resume(old, new, "p")
    assert "train.epochs" in MAY_CHANGE and "optim.lr" in MAY_CHANGE


def test_check_resume_compares_what_an_old_checkpoint_has():
    old = {"model": {"kind": "linear", "sizes": [3, 1]}, "config": {"optim": {"name": "adam"}}}
    check_resume(old, meta_of(model__kind="linear") | {"model": old["model"]}, "p")
    assert "optim.name = 'adam'; this run has 'sgd'" in refusal(old, meta_of(optim__name="sgd"))
    check_resume({}, meta_of(), "p")

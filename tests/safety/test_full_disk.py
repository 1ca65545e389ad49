"""A full disk during a checkpoint, the final writes and a predict: the job fails with one
clear line, status.json says failed, the previous checkpoint survives, no temporary file is
left behind, and nothing hangs. The disk is a small tmpfs mounted for the test (root only).
"""

import contextlib
import json
import os
import subprocess
import time

import numpy as np
import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import datagen, finish, lepton, mpi_env, ok, start_mpi, write_config
from tests.safety.conftest import assert_unchanged, check_failure, leftover_temporaries, snapshot

RANKS = 2


@contextlib.contextmanager
def small_disk(where, size):
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk, leave=0):
    """Take all but ``leave`` bytes of the disk with a file of the test's own."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize - leave
    with open(disk / "filler", "wb") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(free, 0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("disk") / "train.h5", 3000, 32, seed=4)


def config(tmp_path, data, run_dir, **sections):
    base = {
        "data": {"train": str(data)},
        "model": {"kind": "mlp", "hidden": [192, 192], "activation": "tanh"},
        "optim": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 30, "batch_size": 500},
        "checkpoint": {"every_steps": 3, "keep": 3},
        "output": {"dir": str(run_dir), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / "c.toml", base)


def wait_for(predicate, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("condition never met")


def test_full_disk_during_a_checkpoint(tmp_path, data):
    with small_disk(tmp_path / "disk", "12m") as disk:
        run = disk / "run"
        cfg = config(tmp_path, data, run)
        inputs = snapshot(data, cfg)
        env = mpi_env(LEPTON_FAULT="delay=0.05")
        proc = start_mpi(RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=env)
        ckpts = run / "checkpoints"
        wait_for(lambda: len(list(ckpts.glob("ckpt-*.h5"))) >= 1, proc)
        fill(disk, leave=64 << 10)  # status.json still fits; a checkpoint does not
        res = finish(proc, timeout=120)
        check_failure(res, 1, "No space left on device")
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "failed", status
        good = sorted(ckpts.glob("ckpt-*.h5"))
        assert good, "the previous checkpoint survives"
        for path in good:
            assert np.isfinite(read_checkpoint(path).params).all()  # passes its checksum
        assert not leftover_temporaries(run)
        assert_unchanged(inputs, data, cfg)


def test_full_disk_while_writing_the_model_and_results(tmp_path, data):
    with small_disk(tmp_path / "disk", "12m") as disk:
        run = disk / "run"
        # no checkpoint in the loop: the first big write is the model at the end
        cfg = config(tmp_path, data, run, checkpoint={"every_steps": 10**9}, train={"epochs": 3})
        env = mpi_env(LEPTON_FAULT="delay=0.05")
        proc = start_mpi(RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=env)
        wait_for((run / "status.json").exists, proc)
        fill(disk, leave=64 << 10)
        res = finish(proc, timeout=120)
        check_failure(res, 1, "No space left on device")
        assert json.loads((run / "status.json").read_text())["status"] == "failed"
        assert not (run / "model.h5").exists() and not (run / "results.json").exists()
        assert not leftover_temporaries(run)


def test_full_disk_during_predict(tmp_path, data):
    run = tmp_path / "run"
    small = config(tmp_path, data, run, model={"hidden": [4]}, train={"epochs": 1})
    ok(lepton(RANKS, "train", small))
    with small_disk(tmp_path / "disk", "1m") as disk:
        keep = disk / "keep.txt"
        keep.write_text("a user's file on the same disk")
        out = disk / "pred.h5"
        res = lepton(RANKS, "predict", "--model", run / "model.h5", "--data", data, "--out", out)
        # 3000 rows fit: make the disk full first
        assert res.returncode == 0 and out.exists(), res.stderr
        out.unlink()
        fill(disk, leave=16 << 10)
        before = snapshot(keep, data, run)
        res = lepton(RANKS, "predict", "--model", run / "model.h5", "--data", data, "--out", out)
        check_failure(res, 1, f"cannot write '{out}'", "No space left on device")
        assert not out.exists() and not leftover_temporaries(disk)
        assert_unchanged(before, keep, data, run)

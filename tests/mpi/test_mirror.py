"""The checkpoint mirror in a real job: a 2-rank run with ``checkpoint.mirror`` crashes, its
primary checkpoints directory is deleted, and ``--resume auto`` continues from the mirror's
newest checkpoint, ending with the bits of an uninterrupted run."""

import shutil
import signal
import socket
import subprocess

import numpy as np
import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import (
    datagen,
    finish,
    lepton,
    mpi_env,
    ok,
    read_params,
    small_mlp_config,
    start_mpi,
    wait_for_checkpoint,
)
from tests.resume_checks import check_resumed, newest_valid

RANKS = 2
EXIT_STOPPED = 75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("mirror") / "train.h5", 4001, 6, seed=2)


def config(tmp_path, data, name, **checkpoint):
    return small_mlp_config(tmp_path, data, name, 2, checkpoint=checkpoint)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def ckpt_names(directory):
    return sorted(p.name for p in directory.glob("ckpt-*.h5"))


def test_with_the_primary_checkpoints_deleted_the_run_resumes_from_the_mirror(tmp_path, data):
    ok(lepton(RANKS, "train", config(tmp_path, data, "ref"), timeout=240))
    reference = read_params(tmp_path / "ref" / "model.h5")

    mirror, run = tmp_path / "backup", tmp_path / "crash"
    cfg = config(tmp_path, data, "crash", mirror=str(mirror))
    res = lepton(RANKS, "train", cfg, timeout=240, env=mpi_env(LEPTON_FAULT="raise=1@35"))
    assert res.returncode != 0 and "injected fault" in res.stderr
    (sub,) = [d for d in mirror.iterdir() if d.is_dir()]
    assert sub.name.startswith("crash-") and ckpt_names(sub)
    shutil.rmtree(run / "checkpoints")  # the run's file system lost its checkpoints
    # copies and writes cut short by a crash (their writer is dead), and a file of the user's
    dead = dead_pid()
    host = socket.gethostname()
    leftovers = [
        sub / f".ckpt-00000009-0000000040.h5.{host}.{dead}.tmp",
        run / f".results.json.{host}.{dead}.tmp",
    ]
    for f in leftovers:
        f.write_bytes(b"partial")
    (sub / ".notes.tmp").write_text("mine")

    path, state = newest_valid(sub)  # what --resume auto must continue from
    assert state.step in (10, 20, 30)
    res = ok(lepton(RANKS, "train", cfg, "--resume", "auto", timeout=240))
    check_resumed(res.stdout, run, path, state)
    assert path.parent == sub
    assert not any(f.exists() for f in leftovers) and (sub / ".notes.tmp").read_text() == "mine"
    assert res.stdout.count("temporary file(s) left by an interrupted write") == 2
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit
    # the resumed run mirrored its checkpoints too, rotated alike in both directories
    assert ckpt_names(sub) == ckpt_names(run / "checkpoints")
    assert len(ckpt_names(sub)) == 3


def test_a_stop_waits_for_the_mirror_copy_of_its_checkpoint(tmp_path, data):
    mirror, run = tmp_path / "backup", tmp_path / "stop"
    cfg = config(tmp_path, data, "stop", mirror=str(mirror))
    env = mpi_env(LEPTON_FAULT="delay=0.01")
    proc = start_mpi(RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=env)
    wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGUSR1)
    assert finish(proc, timeout=60).returncode == EXIT_STOPPED
    (sub,) = [d for d in mirror.iterdir() if d.is_dir()]
    newest = ckpt_names(run / "checkpoints")[-1]  # the stop's checkpoint
    assert ckpt_names(sub) == ckpt_names(run / "checkpoints")
    assert (sub / newest).read_bytes() == (run / "checkpoints" / newest).read_bytes()
    assert read_checkpoint(sub / newest).step > 0

"""Jobs that never hang or lose work: signals, a killed or frozen rank, a damaged checkpoint.

Each scenario interrupts a real 3-rank job (made slow with LEPTON_FAULT=delay), then resumes it
and checks that it continued from the newest valid checkpoint's epoch and step (not from step 0)
and that the final parameters are bit-for-bit those of a run that was never interrupted.
"""

import json
import os
import signal
import time

import numpy as np
import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import (
    datagen,
    finish,
    lepton,
    mpi_env,
    ok,
    rank_pids,
    read_params,
    small_mlp_config,
    start_mpi,
)
from tests.resume_checks import check_resumed, newest_valid

RANKS = 3
EXIT_STOPPED, EXIT_WATCHDOG = 75, 76


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("faults") / "train.h5", 4001, 6, seed=2)


def config(tmp_path, data, name, **extra):
    return small_mlp_config(tmp_path, data, name, 4, **extra)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Final parameters of the uninterrupted 3-rank run."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(lepton(RANKS, "train", config(tmp, data, "ref"), timeout=240))
    return read_params(tmp / "ref" / "model.h5")


def slow_job(cfg, **env):
    env = {"LEPTON_FAULT": "delay=0.01", **env}
    return start_mpi(RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=mpi_env(**env))


def wait_for_checkpoints(run, count, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(list((run / "checkpoints").glob("ckpt-*.h5"))) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended early: {proc.communicate()}")
        time.sleep(0.1)
    pytest.fail("no checkpoint appeared")


def resume(cfg, run, reference):
    path, state = newest_valid(run / "checkpoints")  # what --resume auto must continue from
    res = ok(lepton(RANKS, "train", cfg, "--resume", "auto", timeout=240))
    check_resumed(res.stdout, run, path, state)
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    return res


def test_sigkill_of_one_rank_ends_the_job_and_resume_is_exact(data, tmp_path, reference):
    cfg = config(tmp_path, data, "kill")
    run = tmp_path / "kill"
    proc = slow_job(cfg)
    wait_for_checkpoints(run, 2, proc)
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1, 2]
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    res = finish(proc, timeout=60)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 30
    newest = sorted((run / "checkpoints").glob("ckpt-*.h5"))[-1]
    assert read_checkpoint(newest).step > 0  # the last checkpoint is valid
    resume(cfg, run, reference)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_to_launcher_checkpoints_and_resume_is_exact(data, tmp_path, reference, sig):
    cfg = config(tmp_path, data, "sig")
    run = tmp_path / "sig"
    proc = slow_job(cfg, LEPTON_VERBOSE="1")
    wait_for_checkpoints(run, 1, proc)
    proc.send_signal(sig)
    res = finish(proc, timeout=60)
    status = json.loads((run / "status.json").read_text())
    if sig == signal.SIGUSR1:
        assert res.returncode == EXIT_STOPPED, res.stderr
        assert status["status"] == "stopped"
        # every rank stopped at the same step, the one the checkpoint holds
        steps = {
            line.rsplit("at step ", 1)[1].split(";")[0]
            for line in res.stderr.splitlines()
            if "stopped by signal at step" in line
        }
        assert steps == {str(status["step"])}
        assert res.stderr.count("stopped by signal") == RANKS
        newest = sorted((run / "checkpoints").glob("ckpt-*.h5"))[-1]
        assert read_checkpoint(newest).step == status["step"]
    else:
        # mpirun gives ranks about 1 s after SIGTERM: either the stop checkpoint made it, or
        # the previous periodic one is intact; both must resume exactly.
        assert res.returncode != 0
        assert status["status"] in ("stopped", "running")
    resume(cfg, run, reference)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(data, tmp_path, reference):
    cfg = config(tmp_path, data, "trunc")
    run = tmp_path / "trunc"
    proc = slow_job(cfg)
    wait_for_checkpoints(run, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    assert finish(proc, timeout=60).returncode == EXIT_STOPPED
    newest = sorted((run / "checkpoints").glob("ckpt-*.h5"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    res = resume(cfg, run, reference)
    assert newest.name in res.stderr
    assert "trying the previous one" in res.stderr


def test_frozen_rank_is_ended_by_the_watchdog(data, tmp_path):
    cfg = config(tmp_path, data, "frozen", checkpoint={"watchdog_s": 3.0})
    run = tmp_path / "frozen"
    proc = slow_job(cfg)
    wait_for_checkpoints(run, 1, proc)
    os.kill(rank_pids(proc.pid)[2], signal.SIGSTOP)
    t0 = time.monotonic()
    res = finish(proc, timeout=60)
    assert time.monotonic() - t0 < 3.0 + 10.0
    assert res.returncode != 0
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] > 0
    assert "watchdog" in status["error"] and "has not advanced" in res.stderr


def test_uncaught_exception_on_one_rank_ends_the_job_quickly(data, tmp_path):
    cfg = config(tmp_path, data, "boom")
    proc = slow_job(cfg, LEPTON_FAULT="delay=0.01,raise=1@25")
    res = finish(proc, timeout=60)
    assert res.returncode != 0
    assert res.seconds < 30
    assert res.stderr.count("injected fault") >= 1
    assert res.stderr.count("unexpected error on rank 1 of 3") == 1
    assert res.stderr.count("Traceback") == 1  # from the failing rank only


def test_rank_out_of_step_is_detected(data, tmp_path):
    cfg = config(tmp_path, data, "skew")
    proc = slow_job(cfg, LEPTON_FAULT="delay=0.01,skew=2@15")
    res = finish(proc, timeout=60)
    assert res.returncode != 0
    assert "ranks are out of step" in res.stderr

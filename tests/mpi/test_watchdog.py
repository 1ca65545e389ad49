"""The default ("auto") watchdog on real 2-rank jobs, and stragglers named by rank and host.

The auto constants (10 minutes at start-up, a 2-minute floor) are shortened for the tests with
the ``LEPTON_FAULT`` hook ``watchdog_scale``; the multiple of the observed step time is not.
"""

import json
import os
import signal
import socket
import time

import pytest

from tests.conftest import (
    datagen,
    finish,
    lepton,
    mpi_env,
    ok,
    rank_pids,
    small_mlp_config,
    start_mpi,
)

RANKS = 2
ARMED = "watchdog: auto, ending the job if a step takes over"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("watchdog") / "train.h5", 4001, 6, seed=4)


def config(tmp_path, data, name, **extra):
    """No checkpoint.watchdog_s: the default is what is tested."""
    return small_mlp_config(tmp_path, data, name, 3, **extra)


def test_frozen_rank_is_ended_by_the_default_watchdog(data, tmp_path):
    cfg = config(tmp_path, data, "frozen", train={"epochs": 50})
    run = tmp_path / "frozen"
    env = mpi_env(LEPTON_FAULT="delay=0.01,watchdog_scale=0.01")  # floor 1.2 s, start-up 6 s
    proc = start_mpi(RANKS, ["-m", "lepton_hpc", "train", str(cfg)], env=env)
    t0 = time.monotonic()
    while len(list((run / "checkpoints").glob("ckpt-*.h5"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 120, "no checkpoint appeared"
        time.sleep(0.1)
    pid = rank_pids(proc.pid)[1]
    os.kill(pid, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        res = finish(proc, timeout=90)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert time.monotonic() - t_stop < 60  # not the job's time limit
    assert res.returncode != 0, res.stderr
    assert ARMED in res.stdout
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] > 0
    assert "watchdog" in status["error"] and "auto, limit" in status["error"]
    assert "has not advanced" in res.stderr


def test_healthy_run_with_checkpoints_and_evaluation_is_never_ended(data, tmp_path):
    cfg = config(tmp_path, data, "healthy", train={"epochs": 3, "patience": 1})
    env = mpi_env(LEPTON_FAULT="watchdog_scale=0.1")  # floor 12 s, start-up 60 s
    res = ok(lepton(RANKS, "train", cfg, env=env, timeout=300))
    assert ARMED in res.stdout and "has not advanced" not in res.stderr
    assert "straggler" not in res.stderr
    results = json.loads((tmp_path / "healthy" / "results.json").read_text())
    timing = results["ranks_timing"]
    assert [t["rank"] for t in timing] == [0, 1]
    assert all(t["steps"] == results["steps"] and t["host"] for t in timing)


def test_a_slow_rank_is_named_and_shows_in_ranks_timing(data, tmp_path):
    cfg = config(tmp_path, data, "slow")
    env = mpi_env(LEPTON_FAULT="delay=0.05@1")  # rank 1: about 4.5 s more per epoch
    res = ok(lepton(RANKS, "train", cfg, env=env, timeout=300))
    assert f"straggler: rank 1 on host {socket.gethostname()}" in res.stderr
    assert "straggler: rank 0" not in res.stderr
    timing = json.loads((tmp_path / "slow" / "results.json").read_text())["ranks_timing"]
    slow, fast = timing[1], timing[0]
    assert slow["compute_s"] > fast["compute_s"] + 5.0  # its own work is what is slow
    assert fast["comm_s"] > slow["comm_s"] + 5.0  # the others wait for it in the reduction

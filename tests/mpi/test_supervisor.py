"""``lepton launch`` with real jobs: failures are restarted with ``--resume auto`` until the job
completes with the very parameters of an uninterrupted run; bad input, a spent restart budget and
a stop on request end it without another attempt.

Faults are injected with ``LEPTON_FAULT="raise=R@S,once=DIR"``: each error fires on one attempt
only, as a crash would, so the restarted job gets past it.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from lepton_hpc import launch
from lepton_hpc.checkpoint import read_checkpoint
from lepton_hpc.errors import LeptonError
from tests.conftest import (
    PYTHON,
    ROOT,
    datagen,
    finish,
    lepton,
    mpi_env,
    ok,
    rank_pids,
    read_params,
    small_mlp_config,
    wait_for_checkpoint,
)
from tests.resume_checks import RESUMED, check_continued, newest_valid

RANKS = 2
EXIT_STOPPED = 75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("supervisor") / "train.h5", 2001, 6, seed=2)


def config(tmp_path, data, name, **extra):
    return small_mlp_config(tmp_path, data, name, 2, **extra)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Final parameters of the uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(lepton(RANKS, "train", config(tmp, data, "ref"), timeout=240))
    return read_params(tmp / "ref" / "model.h5")


def start_launch(*argv, **env):
    """``python -m lepton_hpc launch ARGV`` (not under mpiexec: it starts its own)."""
    environ = mpi_env(**env)
    environ.pop("SLURM_JOB_ID", None)
    cmd = [PYTHON, "-m", "lepton_hpc", "launch", *map(str, argv)]
    return launch.start(cmd, env=environ, cwd=ROOT)


def supervise(*argv, timeout=300, **env):
    return finish(start_launch(*argv, **env), timeout)


def attempts(stdout):
    return re.findall(r"lepton launch: attempt (\d+)/(\d+) on", stdout)


def check_restarts_exact(res, run, reference, steps):
    """The job resumed once per fault, each time from the step the supervisor named, and ended
    bit for bit where the uninterrupted run ends."""
    said = [
        int(s)
        for s in re.findall(r"attempt \d+/\d+ on 2 rank\(s\), resuming from step (\d+)", res.stdout)
    ]
    assert said == steps, res.stdout
    resumed = RESUMED.findall(res.stdout)
    assert [int(step) for _, _, step in resumed] == steps, res.stdout
    last = res.stdout.rsplit("resuming from ", 1)[1]
    _, epoch, step = resumed[-1]
    check_continued(last, run, int(epoch), int(step))
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_a_failed_rank_is_restarted_and_ends_bitwise_equal(data, tmp_path, reference):
    cfg = config(tmp_path, data, "once")
    run = tmp_path / "once"
    fault = f"raise=1@25,once={tmp_path / 'marks'}"
    res = supervise("--np", RANKS, "--backoff", 0.2, "--", "train", cfg, LEPTON_FAULT=fault)
    ok(res)
    assert attempts(res.stdout) == [("1", "4"), ("2", "4")], res.stdout
    assert "attempt 1/4 failed with exit code 1 (rank 1 failed)" in res.stdout
    assert res.stdout.count("--resume auto") == 1
    check_restarts_exact(res, run, reference, [20])


def test_two_failures_at_different_steps_take_three_attempts(data, tmp_path, reference):
    cfg = config(tmp_path, data, "twice")
    run = tmp_path / "twice"
    fault = f"raise=1@25,raise=0@57,once={tmp_path / 'marks'}"
    res = supervise(
        "--np",
        RANKS,
        "--max-restarts",
        3,
        "--backoff",
        0.2,
        "--",
        "train",
        cfg,
        LEPTON_FAULT=fault,
    )
    ok(res)
    assert attempts(res.stdout) == [("1", "4"), ("2", "4"), ("3", "4")], res.stdout
    assert "restarting in 0.2 s" in res.stdout and "restarting in 0.4 s" in res.stdout
    check_restarts_exact(res, run, reference, [20, 50])


def test_bad_input_is_not_retried(data, tmp_path):
    cfg = config(tmp_path, data, "bad", train={"epoch": 2})  # an unknown key
    res = supervise("--np", RANKS, "--backoff", 0.2, "--", "train", cfg, timeout=180)
    assert res.returncode == 2, res.stdout + res.stderr
    assert attempts(res.stdout) == [("1", "4")], res.stdout
    assert "ended with exit code 2: bad input or config, not retried" in res.stdout
    assert "train.epoch" in res.stderr


def test_no_restarts_left(data, tmp_path):
    cfg = config(tmp_path, data, "spent")
    res = supervise(
        "--np",
        RANKS,
        "--max-restarts",
        0,
        "--",
        "train",
        cfg,
        LEPTON_FAULT="raise=1@5",
        timeout=180,
    )
    assert res.returncode != 0
    assert attempts(res.stdout) == [("1", "1")], res.stdout
    assert "no restarts left (--max-restarts 0)" in res.stdout


def test_sigterm_to_the_supervisor_stops_the_job_with_a_checkpoint(data, tmp_path):
    cfg = config(tmp_path, data, "stop")
    run = tmp_path / "stop"
    proc = start_launch("--np", RANKS, "--", "train", cfg, LEPTON_FAULT="delay=0.05")
    wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    res = finish(proc, timeout=60)
    assert res.returncode == EXIT_STOPPED, res.stdout + res.stderr
    assert attempts(res.stdout) == [("1", "4")], res.stdout
    assert "stopped on SIGTERM" in res.stdout and "no restart" in res.stdout
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped"
    path, state = newest_valid(run / "checkpoints")
    assert state.step == status["step"] == read_checkpoint(path).step > 0


def test_a_sweep_worker_killed_midway_is_recovered_without_repeating_tasks(data, tmp_path):
    """A worker rank dies mid-sweep (SIGKILL): the supervisor starts the sweep again, its journal
    skips the finished runs, and every run ends ok."""
    out = tmp_path / "out"
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'[base.data]\ntrain = "{data}"\nvalidation_fraction = 0.25\nscale = "zscore"\n'
        '[base.model]\nkind = "logistic"\n[base.optim]\nname = "lbfgs"\n[base.train]\n'
        "epochs = 3\n[base.output]\nplot = false\n[sweep]\n"
        'grid = {"optim.lr" = [1.0, 0.5, 0.25, 0.125], "model.l2" = [0.0, 0.01]}\n'
        f'metric = "val.log_loss"\nmode = "min"\nout = "{out}"\n'
    )
    journal = out / "journal.jsonl"
    proc = start_launch(
        "--np", 3, "--backoff", 0.2, "--", "sweep", sweep, LEPTON_FAULT="delay=0.25"
    )
    deadline = time.monotonic() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the sweep did not get going: {finish(proc, 10)}")
        time.sleep(0.05)
    children = ["ps", "-o", "pid=", "--ppid", str(proc.pid)]  # the supervisor's: mpiexec
    mpiexec = int(subprocess.run(children, capture_output=True, text=True, check=True).stdout)
    os.kill(rank_pids(mpiexec)[1], signal.SIGKILL)  # a worker, not the coordinator
    res = ok(finish(proc, timeout=400))
    assert ("2", "4") in attempts(res.stdout), res.stdout
    done = int(re.search(r"(\d+) already done \(journal\)", res.stdout)[1])
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["tasks"]) == 8 and all(t["status"] == "ok" for t in summary["tasks"])
    from_journal = [t for t in summary["tasks"] if t["from_journal"]]
    assert 2 <= done == len(from_journal) < 8
    for task in from_journal:  # finished before the kill: never run again
        assert (out / "logs" / f"{task['id']}.log").read_text().count("attempt at") == 1


def test_a_lost_slot_continues_on_fewer_ranks_bitwise_in_reproducible_mode(data, tmp_path):
    """3 ranks on a hostfile with 3 slots; a rank fails, and before the restart the hostfile
    shrinks to 2 slots (a node gone). mpiexec refuses 3 ranks ("not enough slots"), the
    supervisor continues on 2 without spending a restart, and the run ends with the bits of the
    uninterrupted 3-rank run (reproducible mode: rank-count invariant)."""
    exact = {"comm": {"reproducible": True}}
    ok(lepton(3, "train", config(tmp_path, data, "ref3", **exact), timeout=240))
    reference3 = read_params(tmp_path / "ref3" / "model.h5")
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=3\n")
    env = mpi_env(LEPTON_FAULT=f"raise=1@25,once={tmp_path / 'marks'}")
    env.pop("OMPI_MCA_rmaps_base_oversubscribe")  # the hostfile's slots are the limit
    env.pop("SLURM_JOB_ID", None)
    cfg = config(tmp_path, data, "shrink", **exact)
    argv = ["--np", "3", "--min-np", "2", "--backoff", "1", "--launcher", "mpiexec"]
    argv += ["--launcher-args", f"--hostfile {hosts}", "--", "train", str(cfg)]
    proc = launch.start([PYTHON, "-m", "lepton_hpc", "launch", *argv], env=env, cwd=ROOT)
    lines: list[str] = []
    errors: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "attempt 1/4 failed with" in line:  # printed before the 1 s backoff
                hosts.write_text("localhost slots=2\n")

    readers = [
        threading.Thread(target=pump, daemon=True),
        threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for t in readers:
        t.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out + "".join(errors)
    assert "attempt 1/4 on 3 rank(s)" in out and "attempt 1/4 failed with exit code 1" in out
    assert "could not start (exit code 1 (not enough slots" in out, out
    assert "continuing on 2 rank(s) (--min-np 2)" in out
    assert re.search(r"attempt 2/4 on 2 rank\(s\), resuming from step 20 ", out), out
    assert "attempt 2/4 completed" in out
    assert json.loads((tmp_path / "shrink" / "results.json").read_text())["ranks"] == 2
    assert np.array_equal(read_params(tmp_path / "shrink" / "model.h5"), reference3)


def test_two_ranks_killed_at_different_times_complete_bitwise_equal(data, tmp_path, reference):
    """SIGKILL (as the kernel's OOM killer or a dying node would): rank 1 after the first
    checkpoint, then rank 0 of the restarted job after a later one. The job completes by itself
    with the parameters of the uninterrupted run."""
    cfg = config(tmp_path, data, "killed")
    run = tmp_path / "killed"
    proc = start_launch(
        "--np", RANKS, "--backoff", 0.2, "--", "train", cfg, LEPTON_FAULT="delay=0.1"
    )

    def newest_step() -> int:
        steps = [0]
        for path in (run / "checkpoints").glob("ckpt-*.h5"):
            with contextlib.suppress(OSError, LeptonError):  # rotated away meanwhile
                steps.append(read_checkpoint(path).step)
        return max(steps)

    def ranks_after(step: int, previous: int | None) -> tuple[int, dict[int, int]]:
        """(mpiexec pid, its ranks) once a checkpoint past ``step`` exists under a new mpiexec."""
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint past step {step}: {finish(proc, 10)}")
            children = ["ps", "-o", "pid=", "--ppid", str(proc.pid)]
            out = subprocess.run(children, capture_output=True, text=True, check=False).stdout
            out = out.split()
            if len(out) == 1 and int(out[0]) != previous and newest_step() > step:
                ranks = rank_pids(int(out[0]))
                if len(ranks) == RANKS:
                    return int(out[0]), ranks
            time.sleep(0.05)

    first, ranks = ranks_after(0, None)
    os.kill(ranks[1], signal.SIGKILL)
    _, ranks = ranks_after(newest_step() + 10, first)
    os.kill(ranks[0], signal.SIGKILL)
    res = ok(finish(proc, timeout=300))
    assert attempts(res.stdout) == [("1", "4"), ("2", "4"), ("3", "4")], res.stdout
    assert re.search(r"attempt 1/4 failed with .*rank 1 .*died on SIGKILL", res.stdout), res.stdout
    assert re.search(r"attempt 2/4 failed with .*rank 0 .*died on SIGKILL", res.stdout), res.stdout
    said = [int(s) for s in re.findall(r"rank\(s\), resuming from step (\d+)", res.stdout)]
    resumed = [int(step) for _, _, step in RESUMED.findall(res.stdout)]
    assert said == resumed and len(said) == 2 and 0 < said[0] < said[1], res.stdout
    _, epoch, step = RESUMED.findall(res.stdout)[-1]
    check_continued(res.stdout.rsplit("resuming from ", 1)[1], run, int(epoch), int(step))
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit

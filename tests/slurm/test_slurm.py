"""Real Slurm jobs on the one-node test cluster.

- ``srun --mpi=pmix`` direct launch trains to the same parameters as ``mpirun``, and rank, size
  and node-local rank come from MPI under srun, mpirun and alone;
- ``jobs/slurm_train.sbatch`` (``lepton launch`` with srun or with mpiexec inside the
  allocation) hits a one-minute time limit: Slurm sends SIGUSR1 ahead of it, the ranks
  checkpoint, the script requeues the job, and the requeued job resumes to the parameters of an
  uninterrupted run, bit for bit;
- a rank of the job step killed mid-run: ``lepton launch`` starts the step again inside the same
  allocation (no requeue) and the job ends with the uninterrupted run's parameters;
- ``scontrol requeue`` (what Slurm does itself when a node fails, the job having ``--requeue``):
  the requeued job resumes from the newest checkpoint to the same parameters;
- ``scancel`` mid-run leaves a valid checkpoint (and no requeue), from which the run resumes
  exactly.

Jobs are made slow with ``LEPTON_FAULT=delay=...`` (the math is unchanged) so they can be
interrupted; every wait is bounded.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_hpc.checkpoint import read_checkpoint
from tests.conftest import (
    PYTHON,
    ROOT,
    datagen,
    lepton,
    mpi_env,
    ok,
    read_params,
    run_mpi,
    write_config,
)
from tests.resume_checks import check_continued, check_resumed, newest_valid, resumed_at
from tests.slurm.cluster import TERMINAL

RANKS = 2
LEPTON = str(Path(PYTHON).parent / "lepton")
TEMPLATE = ROOT / "jobs" / "slurm_train.sbatch"
LAUNCHERS = ("mpiexec", "srun")
# Slurm checks time limits every 30 s and sends --signal=...@T at the first check with at most
# T + 30 s left: with a 1-minute limit and T = 15 the signal comes 15 to 45 s after the start.
USR1_OPTION = "--signal=B:USR1@15"
SLOW = "delay=0.05"  # ~1,100 steps take about a minute: the first run is always interrupted


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return datagen(tmp_path_factory.mktemp("slurm-data") / "train.h5", 2000, 5, seed=4)


def config(folder: Path, data: Path, name: str) -> Path:
    """A small MLP: 36 steps per epoch, 31 epochs, a checkpoint every 20 steps."""
    sections = {
        "data": {"train": str(data), "validation_fraction": 0.1, "scale": "zscore"},
        "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 31, "batch_size": 50, "seed": 5},
        "checkpoint": {"every_steps": 20, "keep": 3},
        "output": {"dir": str(folder / name), "plot": False},
    }
    return write_config(folder / f"{name}.toml", sections)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Final parameters of the uninterrupted 2-rank run under mpirun."""
    folder = tmp_path_factory.mktemp("slurm-reference")
    ok(lepton(RANKS, "train", config(folder, data, "ref"), timeout=240))
    return read_params(folder / "ref" / "model.h5")


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("ckpt-*.h5"))


# ---- srun direct launch ------------------------------------------------------------------
def test_srun_direct_launch_gives_the_same_parameters_as_mpirun(
    slurm, job_env, data, reference, tmp_path
):
    cfg = config(tmp_path, data, "srun")
    cmd = ["srun", "--mpi=pmix", "-n", str(RANKS), PYTHON, "-m", "lepton_hpc", "train", str(cfg)]
    res = slurm.run(cmd, env=job_env(), timeout=240, cwd=tmp_path)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert np.array_equal(read_params(tmp_path / "srun" / "model.h5"), reference)  # bit for bit
    assert json.loads((tmp_path / "srun" / "results.json").read_text())["ranks"] == RANKS


WHOAMI = """
import json, os, sys
launched_by = "mpirun" if "OMPI_COMM_WORLD_RANK" in os.environ else os.environ.get("SLURM_PROCID", "-")
from lepton_hpc.comm import world
c = world()
sys.stdout.write(json.dumps([c.rank, c.size, c.node_rank, c.node_size, launched_by]) + "\\n")
"""


@pytest.mark.parametrize("launcher", ["srun", "mpirun", "alone"])
def test_rank_size_and_node_rank_come_from_mpi_under_any_launcher(slurm, job_env, launcher):
    n = 1 if launcher == "alone" else 3
    if launcher == "srun":
        res = slurm.run(
            ["srun", "--mpi=pmix", "-n", "3", PYTHON, "-c", WHOAMI], env=job_env(), timeout=120
        )
    elif launcher == "mpirun":
        res = run_mpi(3, ["-c", WHOAMI], timeout=120)
    else:
        res = subprocess.run(
            [PYTHON, "-c", WHOAMI],
            env=mpi_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert res.returncode == 0, res.stderr
    # ranks write concurrently: find each rank's [...] wherever the launcher put it
    rows = sorted(json.loads(m) for m in re.findall(r"\[[^\[\]]*\]", res.stdout))
    assert [r[:4] for r in rows] == [[r, n, r, n] for r in range(n)]  # one node: node rank = rank
    if launcher == "srun":  # srun started the ranks itself (no mpirun environment)
        assert [r[4] for r in rows] == ["0", "1", "2"]
    if launcher == "mpirun":
        assert {r[4] for r in rows} == {"mpirun"}


def test_doctor_under_srun_passes_and_recommends_pmix(slurm, job_env, tmp_path):
    cmd = ["srun", "--mpi=pmix", "-n", "2", LEPTON, "doctor", "--run-dir", str(tmp_path / "runs")]
    res = slurm.run(cmd, env=job_env(), timeout=120)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "2 rank(s), 2 on this node" in res.stdout
    assert "--mpi=pmix" in res.stdout


# ---- time limit -> USR1 -> checkpoint -> requeue -> exact resume --------------------------
@pytest.fixture(scope="module")
def time_limit_jobs(slurm, job_env, data, tmp_path_factory):
    """The template with each launcher, submitted together with a 1-minute limit, followed until
    they end.

    Once a job has been requeued its limit is raised to 5 minutes, so that one requeue is enough
    and the test stays short (about 80 s for both); the first run always meets the limit.
    """
    folder = tmp_path_factory.mktemp("slurm-time-limit")
    jobs = {}
    t0 = time.monotonic()
    for name in LAUNCHERS:
        env = job_env(LEPTON=LEPTON, LEPTON_FAULT=SLOW, LAUNCHER=name)
        options = [
            f"--ntasks={RANKS}",
            "--time=1",
            USR1_OPTION,
            f"--output={folder}/{name}-%j.out",
            f"--job-name=lepton-{name}",
        ]
        jobs[name] = slurm.sbatch(
            TEMPLATE, [str(config(folder, data, name))], options, env, cwd=folder
        )
    extended, final = set(), {}
    while len(final) < len(jobs):
        for name, job_id in jobs.items():
            job = slurm.job(job_id)
            if job.restarts >= 1 and name not in extended and job.state not in TERMINAL:
                res = slurm.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=5"])
                assert res.returncode == 0, res.stderr
                extended.add(name)
            if job.state in TERMINAL and slurm.gone(job_id):
                final.setdefault(name, job)
        if time.monotonic() - t0 > 300:
            logs = "\n".join(p.read_text() for p in folder.glob("*.out"))
            pytest.fail(f"jobs {jobs} not done after 300 s: {final}\n{logs}\n{slurm.log_tail()}")
        time.sleep(0.5)
    return {
        name: (final[name], folder / name, (folder / f"{name}-{job_id}.out").read_text())
        for name, job_id in jobs.items()
    }


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_time_limit_checkpoints_on_usr1_requeues_and_resumes_exactly(
    time_limit_jobs, reference, launcher
):
    job, run, log = time_limit_jobs[launcher]
    assert (job.state, job.restarts, job.exit_code) == ("COMPLETED", 1, "0:0"), log
    stopped = re.search(r"stopped at step (\d+) by SIGUSR1; requeueing job", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 0 < step < 31 * 36
    _, epoch, at = resumed_at(log)  # the requeued attempt continued from the stop checkpoint
    assert at == step, log
    check_continued(log.split("resuming from", 1)[1], run, epoch, at)
    assert "lepton job: completed" in log
    assert status(run)["status"] == "completed"
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit


# ---- scancel ------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_scancel_leaves_a_valid_checkpoint_and_no_requeue(
    slurm, job_env, data, reference, tmp_path, launcher
):
    cfg = config(tmp_path, data, "cancel")
    run = tmp_path / "cancel"
    env = job_env(LEPTON=LEPTON, LEPTON_FAULT="delay=0.01", LAUNCHER=launcher)
    options = [f"--ntasks={RANKS}", f"--output={tmp_path}/job-%j.out"]
    job_id = slurm.sbatch(TEMPLATE, [str(cfg)], options, env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(checkpoints(run)) < 2:
        assert slurm.job(job_id).state not in TERMINAL, "the job ended before it was cancelled"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.2)
    res = slurm.run(["scancel", str(job_id)])
    assert res.returncode == 0, res.stderr
    job = slurm.wait_for(job_id, TERMINAL, timeout=60)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert job.state == "CANCELLED" and job.restarts == 0, log
    assert "requeueing" not in log
    newest = checkpoints(run)[-1]
    state = read_checkpoint(newest)  # passes its checksum
    assert state.step > 0
    st = status(run)
    if st["status"] == "stopped":  # the ranks checkpointed on SIGTERM (from Slurm, or as the
        # stop signal SIGUSR1 from `lepton launch`, which took SIGTERM too)
        assert st["signal"] in (10, 15) and st["step"] == state.step
    else:  # mpiexec may SIGKILL the ranks 1 s after SIGTERM: the periodic checkpoint is intact
        assert launcher == "mpiexec" and st["status"] == "running", st
    path, state = newest_valid(run / "checkpoints")
    res = ok(lepton(RANKS, "train", cfg, "--resume", "auto", timeout=240))
    check_resumed(res.stdout, run, path, state)
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit


# ---- failures inside the allocation: a killed rank, a requeue ---------------------------------
TRAIN_ARGV = [b"-m", b"lepton_hpc", b"train"]  # how `lepton launch` starts each rank


def job_ranks(job_id: int) -> dict[int, int]:
    """{rank: pid} of the training ranks of Slurm job ``job_id`` on this node (srun's tasks or
    mpiexec's ranks), from their environment."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(
                item.split(b"=", 1)
                for item in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = cmdline.split(b"\0")
        if env.get(b"SLURM_JOB_ID") != str(job_id).encode() or argv[1:4] != TRAIN_ARGV:
            continue  # not this job's, or srun, mpiexec or the supervisor (not a rank)
        ranks[int(env.get(b"OMPI_COMM_WORLD_RANK", env.get(b"SLURM_PROCID", b"-1")))] = int(
            entry.name
        )
    return ranks


def submit_and_wait_for_checkpoints(slurm, job_env, data, folder, launcher, count):
    """Submit the template (a slowed run) and wait until ``count`` checkpoints exist."""
    cfg = config(folder, data, "run")
    env = job_env(LEPTON=LEPTON, LEPTON_FAULT="delay=0.01", LAUNCHER=launcher)
    options = [f"--ntasks={RANKS}", f"--output={folder}/job-%j.out"]
    job_id = slurm.sbatch(TEMPLATE, [str(cfg)], options, env, cwd=folder)
    deadline = time.monotonic() + 120
    while len(checkpoints(folder / "run")) < count:
        assert slurm.job(job_id).state not in TERMINAL, "the job ended too early"
        assert time.monotonic() < deadline, f"no {count} checkpoints after 120 s"
        time.sleep(0.1)
    return job_id, folder / "run"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_killed_rank_restarts_the_step_inside_the_allocation(
    slurm, job_env, data, reference, tmp_path, launcher
):
    job_id, run = submit_and_wait_for_checkpoints(slurm, job_env, data, tmp_path, launcher, 1)
    ranks = job_ranks(job_id)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    job = slurm.wait_for(job_id, TERMINAL, timeout=240)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert (job.state, job.restarts, job.exit_code) == ("COMPLETED", 0, "0:0"), log
    assert "lepton launch: attempt 1/4 failed with" in log
    assert re.search(r"attempt 2/4 on 2 rank\(s\), resuming from step [1-9]", log), log
    _, epoch, at = resumed_at(log)
    check_continued(log.split("resuming from", 2)[2], run, epoch, at)
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit


def test_scontrol_requeue_resumes_from_the_newest_checkpoint(
    slurm, job_env, data, reference, tmp_path
):
    """``scontrol requeue`` ends the running job as a node failure under ``--requeue`` would
    (Slurm signals and kills it, then starts the script again): it continues, not restarts."""
    job_id, run = submit_and_wait_for_checkpoints(slurm, job_env, data, tmp_path, "srun", 2)
    res = slurm.run(["scontrol", "requeue", str(job_id)])
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 300
    while not ((job := slurm.job(job_id)).state in TERMINAL and slurm.gone(job_id)):
        assert time.monotonic() < deadline, f"job {job_id} still {job.state} after 300 s"
        time.sleep(0.5)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert (job.state, job.restarts, job.exit_code) == ("COMPLETED", 1, "0:0"), log
    assert "(requeue 1)" in log
    _, epoch, at = resumed_at(log)
    stopped = re.search(r"stopped at step (\d+) by SIGTERM", log)  # Slurm's signal before the kill
    assert stopped and int(stopped[1]) == at, log
    check_continued(log.split("(requeue 1)", 1)[1].split("resuming from", 1)[1], run, epoch, at)
    assert np.array_equal(read_params(run / "model.h5"), reference)  # bit for bit

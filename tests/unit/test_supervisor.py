"""``lepton launch``: argument checks, the restart policy, backoff, command rewriting, and the
attempt loop run against small stand-in jobs (no MPI)."""

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_hpc import cli, supervisor
from lepton_hpc.errors import EXIT_STOPPED, EXIT_USAGE, EXIT_WATCHDOG, LeptonError
from lepton_hpc.supervisor import (
    Supervisor,
    backoff_delay,
    check_args,
    describe_end,
    exit_status,
    job_command,
    should_retry,
)


def args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["launch", *argv])


def test_arguments_are_parsed_with_defaults():
    a = args("--np", "2", "--", "train", "c.toml", "optim.lr=0.1", "--resume", "auto")
    assert (a.np, a.max_restarts, a.min_np, a.backoff, a.needs_mpi) == (2, 3, None, 2.0, False)
    assert check_args(a) == ["train", "c.toml", "optim.lr=0.1", "--resume", "auto"]
    assert check_args(args("--np", "1", "sweep", "s.toml")) == ["sweep", "s.toml"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--np", "0", "--", "train", "c"], "--np 0: give at least 1 rank"),
        (["--np", "2", "--min-np", "3", "--", "train", "c"], "--min-np 3: give 1 to --np (2)"),
        (["--np", "2", "--min-np", "0", "--", "train", "c"], "--min-np 0"),
        (["--np", "2", "--max-restarts", "-1", "--", "train", "c"], "--max-restarts -1"),
        (["--np", "2", "--backoff", "-1", "--", "train", "c"], "--backoff -1"),
        (["--np", "2", "--", "evaluate", "--model", "m"], "(got 'evaluate')"),
        (["--np", "2"], "(got nothing)"),
    ],
)
def test_bad_arguments_are_one_error(argv, message):
    with pytest.raises(LeptonError) as err:
        check_args(args(*argv))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_arguments_exit_2_in_one_line(capsys):
    assert cli.main(["launch", "--np", "0", "--", "train", "c.toml"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "lepton: error: --np 0: give at least 1 rank\n"


def test_launch_never_initialises_mpi():
    code = (
        "import sys; from lepton_hpc import cli\n"
        "rc = cli.main(['launch', '--np', '0', '--', 'train', 'c.toml'])\n"
        "assert rc == 2 and not any(m.startswith('mpi4py') for m in sys.modules), rc\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize(
    ("returncode", "retry"),
    [
        (0, False),
        (EXIT_USAGE, False),
        (EXIT_STOPPED, False),
        (1, True),
        (137, True),
        (EXIT_WATCHDOG, True),
        (-signal.SIGKILL, True),
        (-signal.SIGSEGV, True),
    ],
)
def test_restart_policy(returncode, retry):
    assert should_retry(returncode) is retry


def test_backoff_doubles_up_to_a_minute():
    assert [backoff_delay(k) for k in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert [backoff_delay(k, 0.5) for k in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff_delay(3, 0.0) == 0.0


def test_a_restarted_train_resumes_auto_exactly_once():
    job = ["train", "c.toml", "optim.lr=0.1"]
    assert job_command(job, restart=False) == job
    assert job_command(job, restart=True) == [*job, "--resume", "auto"]
    mine = ["train", "c.toml", "--resume", "auto", "x=1"]
    assert job_command(mine, restart=False) == mine  # the user's own flag, as given
    assert job_command(mine, restart=True) == ["train", "c.toml", "x=1", "--resume", "auto"]
    # A named checkpoint or --overwrite would move or delete what the failed attempt wrote.
    again = job_command(["train", "c.toml", "--resume", "old.h5", "--overwrite"], restart=True)
    assert again == ["train", "c.toml", "--resume", "auto"]
    assert job_command(["train", "c", "--resume=old.h5"], restart=True).count("--resume") == 1


def test_sweep_and_predict_run_again_as_they_are():
    for job in (["sweep", "s.toml"], ["predict", "--model", "m", "--data", "d", "--out", "o"]):
        assert job_command(job, restart=True) == job


def test_why_an_attempt_ended():
    assert describe_end(3, "") == "exit code 3"
    assert describe_end(-signal.SIGKILL, "") == "killed by SIGKILL"
    killed = (
        "mpiexec noticed that process rank 1 with PID 0 on node n7 exited on signal 9 (Killed)."
    )
    assert describe_end(137, killed) == "exit code 137 (rank 1 on host n7 died on SIGKILL)"
    boom = "lepton: unexpected error on rank 2 of 3:\nTraceback ..."
    assert describe_end(1, boom) == "exit code 1 (rank 2 failed)"
    assert "watchdog" in describe_end(EXIT_WATCHDOG, "")
    assert describe_end(EXIT_USAGE, "Process name: [[5,1],1]\n") == "exit code 2"
    assert "not enough slots" in describe_end(1, "There are not enough slots available in")
    assert exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM and exit_status(2) == 2


def test_mpiexec_or_srun(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(supervisor.os, "sched_getaffinity", lambda _pid: {0, 1})
    cmd, env = supervisor.launcher_command(2, ["train", "c.toml"])
    assert cmd == ["mpiexec", "-n", "2", sys.executable, "-m", "lepton_hpc", "train", "c.toml"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert supervisor.launcher_command(3, ["train", "c"])[0][:4] == [
        "mpiexec",
        "-n",
        "3",
        "--oversubscribe",
    ]
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(supervisor.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert supervisor.launcher_command(4, ["sweep", "s"])[0][:5] == [
        "srun",
        "--mpi=pmix",
        "-n",
        "4",
        sys.executable,
    ]


def test_launcher_choice_and_its_options(monkeypatch):
    """mpiexec on this node alone is oversubscribed and kept on loopback; inside an allocation
    or with a hostfile the slots and the network are the site's, so a shortage shows."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("OMPI_MCA_btl_tcp_if_include", raising=False)
    monkeypatch.setattr(supervisor.os, "sched_getaffinity", lambda _pid: {0, 1})
    cmd, env = supervisor.launcher_command(3, ["train", "c"], "mpiexec", ["--hostfile", "h"])
    assert cmd[:5] == ["mpiexec", "-n", "3", "--hostfile", "h"]
    assert "--oversubscribe" not in cmd and "OMPI_MCA_btl_tcp_if_include" not in env
    cmd, _ = supervisor.launcher_command(3, ["train", "c"], "auto", ["--nooversubscribe"])
    assert "--oversubscribe" not in cmd
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")  # a singleton's variable: never passed on
    cmd, env = supervisor.launcher_command(3, ["train", "c"], "mpiexec", ["--bind-to", "core"])
    assert cmd[:5] == ["mpiexec", "-n", "3", "--bind-to", "core"]
    assert "--oversubscribe" not in cmd and "OMPI_COMM_WORLD_RANK" not in env
    assert "OMPI_MCA_btl_tcp_if_include" not in env
    cmd, _ = supervisor.launcher_command(2, ["train", "c"], "srun", ["--exclusive"])
    assert cmd[:5] == ["srun", "--mpi=pmix", "-n", "2", "--exclusive"]


def test_launcher_args_are_checked():
    with pytest.raises(LeptonError, match="--launcher-args"):
        check_args(args("--np", "2", "--launcher-args", "'unclosed", "--", "train", "c.toml"))


# ---- the attempt loop, with stand-in jobs --------------------------------------------------------
def scripted(monkeypatch, tmp_path, body: str):
    """Make every attempt run ``body`` (Python; ``NP`` is the rank count, ``N`` the attempt)."""
    counter = tmp_path / "attempts"

    def fake(np, command, *_):
        code = (
            f"import pathlib, sys\nNP = {np}\nc = pathlib.Path({str(counter)!r})\n"
            "N = int(c.read_text()) + 1 if c.exists() else 1\nc.write_text(str(N))\n"
            f"print('job', {command!r}, flush=True)\n{body}"
        )
        return [sys.executable, "-c", code], None

    monkeypatch.setattr(supervisor, "launcher_command", fake)
    return counter


def test_a_failing_job_is_restarted_until_it_succeeds(monkeypatch, tmp_path, capsys):
    scripted(monkeypatch, tmp_path, "sys.exit(0 if N == 3 else 1)")
    assert Supervisor(["sweep", "s.toml"], 2, 2, 3, 0.0).run() == 0
    out = capsys.readouterr().out
    assert "attempt 3/4 on 2 rank(s)" in out and "attempt 3/4 completed" in out
    assert "attempt 1/4 failed with exit code 1; restarting in 0 s" in out


def test_no_restarts_left(monkeypatch, tmp_path, capsys):
    scripted(monkeypatch, tmp_path, "sys.exit(5)")
    assert Supervisor(["predict", "--model", "m"], 1, 1, 1, 0.0).run() == 5
    out = capsys.readouterr().out
    assert "attempt 2/2 failed with exit code 5; no restarts left (--max-restarts 1)" in out


@pytest.mark.parametrize("code", [EXIT_USAGE, EXIT_STOPPED])
def test_bad_input_and_stops_are_not_retried(monkeypatch, tmp_path, capsys, code):
    counter = scripted(monkeypatch, tmp_path, f"sys.exit({code})")
    assert Supervisor(["sweep", "s.toml"], 2, 2, 3, 0.0).run() == code
    assert counter.read_text() == "1" and "not retried" in capsys.readouterr().out


def test_fewer_slots_step_the_rank_count_down_to_min_np(monkeypatch, tmp_path, capsys):
    body = "if NP > 2:\n    print('There are not enough slots available', file=sys.stderr)\n"
    body += "    sys.exit(1)\n"
    scripted(monkeypatch, tmp_path, body)
    assert Supervisor(["sweep", "s.toml"], 4, 2, 3, 0.0).run() == 0
    out = capsys.readouterr().out
    assert "continuing on 3 rank(s) (--min-np 2)" in out
    assert "continuing on 2 rank(s) (--min-np 2)" in out
    assert "attempt 1/4 on 2 rank(s)" in out and "attempt 1/4 completed" in out  # none spent


def test_a_restarted_train_says_where_it_resumes(monkeypatch, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ntrain = "x.h5"\n[output]\ndir = "{tmp_path / "run"}"\n')
    scripted(monkeypatch, tmp_path, "sys.exit(0 if N == 2 else 1)")
    assert Supervisor(["train", str(cfg)], 1, 1, 1, 0.0).run() == 0
    out = capsys.readouterr().out
    assert "attempt 2/2 on 1 rank(s), from step 0 (no checkpoint yet)" in out
    assert f"job ['train', '{cfg}', '--resume', 'auto']" in out


def test_processes_an_attempt_leaves_behind_are_ended_before_the_next(
    monkeypatch, tmp_path, capsys
):
    """A rank that outlives its mpiexec holds the run directory's lock: the next attempt waits
    for it to exit, and kills it past LINGER_S."""
    pids = tmp_path / "pids"
    body = (
        "import subprocess\n"
        "p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL)\n"
        f"with open({str(pids)!r}, 'a') as f:\n    f.write(f'{{p.pid}}\\n')\n"
        "sys.exit(0 if N == 2 else 1)\n"
    )
    scripted(monkeypatch, tmp_path, body)
    monkeypatch.setattr(supervisor, "LINGER_S", 0.3)
    assert Supervisor(["sweep", "s.toml"], 1, 1, 1, 0.0).run() == 0
    out = capsys.readouterr().out
    assert out.count("killed 1 process(es) the attempt left behind after 0.3 s") == 2
    for pid in map(int, pids.read_text().split()):
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

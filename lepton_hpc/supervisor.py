"""``lepton launch``: start a job under ``mpiexec`` (or ``srun``) and restart it after a failure.

The supervisor is not an MPI rank: it never initialises MPI (``needs_mpi=False``, and nothing
here imports ``mpi4py``). It starts ``mpiexec -n N python -m lepton_hpc <command>`` in a session
of its own (``srun --mpi=pmix -n N ...`` inside a Slurm allocation; ``--launcher`` chooses
explicitly and ``--launcher-args`` adds options such as a hostfile), copies the job's output
through, and decides from the exit status what happens next:

- exit 0: done; exit 2 (bad input or config) and the stop exit (a checkpoint was written on a
  signal): never retried, the supervisor exits with that code;
- any other end (a non-zero exit, a rank killed by a signal, the watchdog): the job is started
  again, up to ``--max-restarts`` times, after a backoff that doubles from ``--backoff`` seconds
  up to 60 s. A restarted ``train`` gets ``--resume auto`` (once; a ``--resume PATH`` or
  ``--overwrite`` of the first attempt is dropped, they would move or delete the checkpoints
  written since); ``sweep`` continues from its journal and ``predict`` runs again as it is;
- an attempt the launcher refused because fewer slots exist than ranks asked for (a node of
  the allocation or hostfile is gone) is started again at once with one rank less, down to
  ``--min-np``, without spending a restart (nothing ran).

SIGTERM, SIGUSR1 and SIGINT sent to the supervisor reach the job as its stop signal (SIGUSR1,
which mpiexec and srun pass to every rank): the ranks write a checkpoint and exit with the stop
code, and the supervisor exits with it without restarting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .errors import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, EXIT_WATCHDOG, LeptonError
from .launch import mpi_env

COMMANDS = ("train", "sweep", "predict")
LAUNCHERS = ("auto", "srun", "mpiexec")
# mpiexec options that place ranks on other hosts: then the job is not this node's alone, and
# neither --oversubscribe nor the loopback-only network defaults apply.
HOST_OPTIONS = (
    "--host",
    "-host",
    "-H",
    "--hostfile",
    "-hostfile",
    "--machinefile",
    "-machinefile",
    "--default-hostfile",
    "--rankfile",
    "-rf",
)
OVERSUBSCRIBE_OPTIONS = (
    "--oversubscribe",
    "-oversubscribe",
    "--nooversubscribe",
    "-nooversubscribe",
)
DEFAULT_MAX_RESTARTS = 3
DEFAULT_BACKOFF_S = 2.0
BACKOFF_CAP_S = 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# How long the processes an attempt leaves behind (ranks still exiting after mpiexec returned,
# holding the run directory's lock) may take before they are killed and the next attempt starts.
LINGER_S = 10.0
JOB_STOP_SIGNAL = signal.SIGUSR1  # what the ranks' StopFlag takes and launchers pass on
# What mpiexec (OpenMPI) or srun prints when fewer slots or CPUs exist than ranks requested.
FEW_SLOTS = re.compile(
    r"not enough slots|more processors requested than permitted|"
    r"requested node configuration is not available",
    re.IGNORECASE,
)
_SIGNALLED = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)")
_EXITED = re.compile(r"Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_ABORTED = re.compile(r"MPI_ABORT was invoked on rank (\d+)")
_UNEXPECTED = re.compile(r"unexpected error on rank (\d+) of")
_NODE = re.compile(r"Local host:\s*(\S+)|on node (\S+)")


# ---- the command line --------------------------------------------------------------------------
def register_launch(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="run a train, sweep or predict job under mpiexec/srun; restart it when it fails",
        usage="lepton launch --np N [--max-restarts R] [--min-np M] [--backoff S] "
        "[--launcher auto|srun|mpiexec] [--launcher-args ARGS] -- {train,sweep,predict} ...",
    )
    p.add_argument("--np", type=int, required=True, help="ranks to start")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=DEFAULT_MAX_RESTARTS,
        help=f"restarts after failures (default {DEFAULT_MAX_RESTARTS})",
    )
    p.add_argument(
        "--min-np",
        type=int,
        default=None,
        help="when fewer slots remain, continue on fewer ranks, down to this many (default: --np)",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=DEFAULT_BACKOFF_S,
        help=f"seconds before the first restart, doubling up to {BACKOFF_CAP_S:.0f} "
        f"(default {DEFAULT_BACKOFF_S:g})",
    )
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="auto",
        help="auto (default): srun inside a Slurm allocation, mpiexec elsewhere",
    )
    p.add_argument(
        "--launcher-args",
        default="",
        metavar="ARGS",
        help="extra options for srun or mpiexec, as one string (e.g. '--hostfile hosts')",
    )
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- train|sweep|predict ARGS")
    p.set_defaults(func=run_launch, needs_mpi=False)


def check_args(args: argparse.Namespace) -> list[str]:
    """The job's command (after ``--``) once the options are checked; ``LeptonError`` if not."""
    job = list(args.job)
    if job[:1] == ["--"]:
        job = job[1:]
    if args.np < 1:
        raise LeptonError(f"--np {args.np}: give at least 1 rank")
    if args.min_np is not None and not 1 <= args.min_np <= args.np:
        raise LeptonError(f"--min-np {args.min_np}: give 1 to --np ({args.np})")
    if args.max_restarts < 0:
        raise LeptonError(f"--max-restarts {args.max_restarts}: give 0 or more")
    if not args.backoff >= 0:
        raise LeptonError(f"--backoff {args.backoff}: give 0 or more seconds")
    try:
        shlex.split(args.launcher_args)
    except ValueError as exc:
        raise LeptonError(f"--launcher-args {args.launcher_args!r}: {exc}") from None
    if args.launcher == "srun" and not shutil.which("srun"):
        raise LeptonError("--launcher srun: no srun command on the PATH")
    if not job or job[0] not in COMMANDS:
        got = f"'{job[0]}'" if job else "nothing"
        raise LeptonError(f"lepton launch runs one of {', '.join(COMMANDS)} after '--' (got {got})")
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) > 1:
        raise LeptonError("run `lepton launch` alone: it starts its own mpiexec or srun job")
    return job


def run_launch(args: argparse.Namespace, _comm, _log) -> int:
    """The ``lepton launch`` command; it runs alone, outside MPI (``needs_mpi=False``)."""
    job = check_args(args)
    supervisor = Supervisor(job, args.np, args.min_np or args.np, args.max_restarts, args.backoff)
    supervisor.launcher = args.launcher
    supervisor.launcher_args = shlex.split(args.launcher_args)
    return supervisor.run()


# ---- the policy ----------------------------------------------------------------------------------
def should_retry(returncode: int) -> bool:
    """Whether an attempt that ended with ``returncode`` (negative: killed by that signal) is
    started again: not when it succeeded, was refused as bad input, or stopped on request."""
    return returncode not in (EXIT_OK, EXIT_USAGE, EXIT_STOPPED)


def backoff_delay(restart: int, first: float = DEFAULT_BACKOFF_S) -> float:
    """Seconds before restart number ``restart`` (1, 2, ...): ``first`` doubling, capped."""
    return min(first * 2 ** (restart - 1), BACKOFF_CAP_S)


def job_command(job: list[str], restart: bool) -> list[str]:
    """The lepton command of an attempt: a restarted ``train`` continues with ``--resume auto``
    (exactly once); its first attempt runs as the user gave it."""
    if job[0] != "train" or not restart:
        return list(job)
    out, skip = [], False
    for arg in job:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not (arg.startswith("--resume=") or arg == "--overwrite"):
            out.append(arg)
    return [*out, "--resume", "auto"]


def describe_end(returncode: int, output: str) -> str:
    """Why an attempt ended, in words: the exit code or signal, and the rank and host that
    failed when the job's output (mpiexec's messages, lepton's error lines) names them."""
    if returncode < 0:
        try:
            what = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"killed by signal {-returncode}"
    else:
        what = f"exit code {returncode}"
    details = []
    if returncode == EXIT_WATCHDOG:
        details.append("the watchdog ended a job that stopped advancing")
    if m := _SIGNALLED.search(output):
        sig = int(m[3])
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        details.append(f"rank {m[1]} on host {m[2]} died on {name}")
    elif returncode != EXIT_USAGE:  # bad input: every rank refused it, none failed first
        rank = next(
            (m[1] for r in (_UNEXPECTED, _ABORTED, _EXITED) if (m := r.search(output))), None
        )
        if rank is not None:
            node = _NODE.search(output)
            host = f" on host {node[1] or node[2]}" if node else ""
            details.append(f"rank {rank}{host} failed")
    if FEW_SLOTS.search(output):
        details.append("not enough slots for the ranks asked for")
    return what + (f" ({'; '.join(details)})" if details else "")


def exit_status(returncode: int) -> int:
    """A process exit status for ``returncode`` (a signal ``S`` becomes 128 + S, as shells do)."""
    return 128 - returncode if returncode < 0 else returncode


def resume_point(job: list[str]) -> str:
    """Where a restarted ``train`` continues: the newest valid checkpoint of its run directory
    or its checkpoint mirror (from the config and its overrides), as words for the log."""
    from .checkpoint import latest_valid, mirror_dir
    from .config import load_config
    from .log import Log

    positional = [a for a in job[1:] if not a.startswith("-")]
    if "--resume" in job:  # the value of --resume is not a positional argument
        value = job[job.index("--resume") + 1 : job.index("--resume") + 2]
        positional = [a for a in positional if a not in value]
    try:
        cfg = load_config(positional[0], [a for a in positional[1:] if "=" in a])
        run = Path(cfg.output.dir)
        mirror = mirror_dir(cfg.checkpoint.mirror, run)  # --resume auto looks there too
        found = latest_valid(run / "checkpoints", Log(), *([mirror] if mirror else []))
    except (LeptonError, OSError, ValueError, IndexError) as exc:  # the job reports these
        return f"resuming where it can ({exc})"
    if found is None:
        return "from step 0 (no checkpoint yet)"
    path, state = found
    return f"resuming from step {state.step} ({path})"


# ---- running attempts ----------------------------------------------------------------------
def session_processes(sid: int) -> list[int]:
    """The live processes (zombies have already let go of their files) of session ``sid``."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux
        return []
    pids = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def end_session(sid: int, linger: float) -> list[int]:
    """Wait up to ``linger`` seconds for what is left of an attempt's session (the attempt ran in
    a session of its own) to exit, then SIGKILL the rest; returns the pids it had to kill."""
    deadline = time.monotonic() + linger
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while left and session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def in_allocation() -> bool:
    """Inside a Slurm job (its allocation decides the slots)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def launcher_command(
    np: int, command: list[str], launcher: str = "auto", extra: list[str] | tuple = ()
) -> tuple[list[str], dict[str, str]]:
    """The launcher's command line and environment for ``np`` ranks of ``command``.

    ``auto``: ``srun`` inside a Slurm allocation (when srun exists), else ``mpiexec``. mpiexec
    outside an allocation and without host options runs the job on this node alone: it is
    oversubscribed past the cores and gets the loopback-only defaults of ``launch.mpi_env``.
    Inside an allocation or with host options the slots are the allocation's or the hostfile's
    (asking for more fails with "not enough slots", which ``--min-np`` answers), and the
    network is left to the site's configuration.
    """
    lepton = [sys.executable, "-m", "lepton_hpc", *command]
    extra = list(extra)
    if launcher == "srun" or (launcher == "auto" and in_allocation() and shutil.which("srun")):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return ["srun", "--mpi=pmix", "-n", str(np), *extra, *lepton], env
    local = not in_allocation() and not any(a.split("=", 1)[0] in HOST_OPTIONS for a in extra)
    if not local:  # only the singleton variables go (this process never initialised MPI)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OMPI_", "PMIX_")) or k.startswith(("OMPI_ALLOW", "OMPI_MCA"))
        }
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env["PYTHONUNBUFFERED"] = "1"
        return ["mpiexec", "-n", str(np), *extra, *lepton], env
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    chosen = any(a in OVERSUBSCRIBE_OPTIONS for a in extra)
    over = ["--oversubscribe"] if np > cores and not chosen else []
    return ["mpiexec", "-n", str(np), *over, *extra, *lepton], mpi_env()


class Supervisor:
    """Runs the attempts of one job; see the module docstring for the policy."""

    def __init__(
        self, job: list[str], np: int, min_np: int, max_restarts: int, backoff: float
    ) -> None:
        self.job, self.np, self.min_np = job, np, min_np
        self.max_restarts, self.backoff = max_restarts, backoff
        self.launcher, self.launcher_args = "auto", []
        self.stop_signal = 0
        self.proc: subprocess.Popen | None = None
        self._print = threading.Lock()

    def say(self, message: str) -> None:
        with self._print:
            print(f"lepton launch: {message}", flush=True)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            return self._attempts()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, JOB_STOP_SIGNAL)

    def _attempts(self) -> int:
        total = self.max_restarts + 1
        attempt, launched = 1, 0  # attempt: the restart budget spent + 1; launched: any start
        while True:
            launched += 1
            command = job_command(self.job, restart=launched > 1)
            where = ""
            if launched > 1 and self.job[0] == "train":
                where = f", {resume_point(command)}"
            cmd, env = launcher_command(self.np, command, self.launcher, self.launcher_args)
            self.say(f"attempt {attempt}/{total} on {self.np} rank(s){where}: {' '.join(cmd)}")
            returncode, output = self._run_once(cmd, env)
            if self.stop_signal:
                name = signal.Signals(self.stop_signal).name
                self.say(f"stopped on {name}: {describe_end(returncode, output)}; no restart")
                return exit_status(returncode)
            if returncode == EXIT_OK:
                self.say(f"attempt {attempt}/{total} completed")
                return EXIT_OK
            why = describe_end(returncode, output)
            if not should_retry(returncode):
                reason = "bad input or config" if returncode == EXIT_USAGE else "stopped"
                self.say(f"attempt {attempt}/{total} ended with {why}: {reason}, not retried")
                return returncode
            if FEW_SLOTS.search(output) and self.np > self.min_np:
                # Nothing ran (the launcher refused to start): no restart is spent, and the
                # next start comes at once, until the rank count fits what is left.
                self.np -= 1
                self.say(
                    f"attempt {attempt}/{total} could not start ({why}); continuing on "
                    f"{self.np} rank(s) (--min-np {self.min_np})"
                )
                if not self._sleep(min(self.backoff, 1.0)):
                    break
                continue
            if attempt == total:
                self.say(
                    f"attempt {attempt}/{total} failed with {why}; no restarts left "
                    f"(--max-restarts {self.max_restarts})"
                )
                return exit_status(returncode)
            delay = backoff_delay(attempt, self.backoff)
            self.say(f"attempt {attempt}/{total} failed with {why}; restarting in {delay:g} s")
            attempt += 1
            if not self._sleep(delay):
                break
        self.say(f"stopped on {signal.Signals(self.stop_signal).name} before a restart")
        return EXIT_STOPPED

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False when a stop signal came meanwhile."""
        end = time.monotonic() + seconds
        while not self.stop_signal and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return not self.stop_signal

    def _run_once(self, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        """Run one attempt, its output copied through; (return code, the output's last lines)."""
        tail: deque[str] = deque(maxlen=400)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        if self.stop_signal:  # a signal between the decision to start and the start
            self._on_signal(self.stop_signal, None)
        pumps = [
            threading.Thread(target=self._pump, args=(src, dst, tail), daemon=True)
            for src, dst in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr))
        ]
        for t in pumps:
            t.start()
        returncode = self.proc.wait()
        left = end_session(self.proc.pid, LINGER_S)  # the next attempt must find the lock free
        if left:
            self.say(f"killed {len(left)} process(es) the attempt left behind after {LINGER_S:g} s")
        for t in pumps:
            t.join(timeout=30)  # a rank left behind must not hold the supervisor
        self.proc = None
        return returncode, "".join(tail)

    def _pump(self, src, dst, tail: deque[str]) -> None:
        for line in src:
            tail.append(line)
            with self._print:
                dst.write(line)
                dst.flush()
        src.close()

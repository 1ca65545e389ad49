"""A one-node Slurm cluster that the tests start themselves: munged, slurmctld, slurmd.

Everything lives in one temporary folder: a private munge key and socket (so no system munged is
touched), ``slurm.conf`` (found by every Slurm command through ``SLURM_CONF``), state and spool
folders, and the daemons' logs. Ports are chosen free at start. The daemons run in the foreground
(``-D``) as children of the test process, each in its own session, and are stopped at the end.

Timings are tuned for tests: a requeued job is eligible again after ``cred_expire`` (10 s, not
120 s) and the main scheduler runs every 2 s (not 60 s), so a requeue round trip takes about 12 s.
Slurm itself checks time limits (and ``--signal`` times) every 30 s, which tests must allow for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo", "scancel")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class CannotInstall(RuntimeError):
    """A package could not be installed here (not root, no apt-get, apt-get failed)."""


def in_ci() -> bool:
    """CI (``CI=true``) must run what needs Slurm or lmod: there, a failed install fails."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c, path=os.environ["PATH"] + ":/usr/sbin") is None]


def apt_get_install(packages: tuple[str, ...], timeout: float = 900) -> None:
    """``apt-get install`` Debian packages (root only); raises ``CannotInstall`` on failure."""
    if os.geteuid() != 0:
        raise CannotInstall(f"{', '.join(packages)} missing and we are not root")
    if shutil.which("apt-get") is None:
        raise CannotInstall(f"{', '.join(packages)} missing and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        try:
            res = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise CannotInstall(f"{' '.join(cmd)} took more than {timeout} s") from None
        if res.returncode != 0:
            raise CannotInstall(
                f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}"
            )


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge, only when one of their commands is missing."""
    if not missing_commands():
        return
    apt_get_install(PACKAGES)
    if missing_commands():
        raise CannotInstall(f"still missing after apt-get install: {missing_commands()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    """What ``scontrol show job`` says about a job."""

    id: int
    state: str
    reason: str
    restarts: int
    exit_code: str
    time_limit: str


class SlurmCluster:
    """Start with ``start()``, stop with ``stop()``; ``env()`` is the environment for clients."""

    def __init__(self, cpus: int = 4, kill_wait: int = 10) -> None:
        self.cpus = cpus
        self.kill_wait = kill_wait
        self.root = Path(tempfile.mkdtemp(prefix="lepton-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must reach its socket folder
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- set-up ----------------------------------------------------------------------------
    def _write_munge(self) -> Path:
        """A private key (munge-only folder) and a socket folder everyone can traverse."""
        keys, run = self.root / "munge-key", self.root / "munge-run"
        for folder, mode in ((keys, 0o700), (run, 0o755)):
            folder.mkdir()
            shutil.chown(folder, "munge", "munge")
            folder.chmod(mode)
        key = keys / "munge.key"
        key.write_bytes(os.urandom(128))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        return run / "munge.socket"

    def _write_conf(self, munge_socket: Path) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        self.conf.write_text(
            f"""# one-node test cluster (tests/slurm/cluster.py)
ClusterName=lepton
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        out = (self.logs / f"{name}.out").open("w")
        self._procs[name] = subprocess.Popen(
            cmd,
            **kw,
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    def start(self, timeout: float = 90) -> SlurmCluster:
        """Start the daemons and wait (at most ``timeout`` s) until the node is idle."""
        ensure_installed()
        munge_socket = self._write_munge()
        self._write_conf(munge_socket)
        k = self.root / "munge-key"
        self._spawn(
            "munged",
            [
                "munged", "--foreground",
                f"--socket={munge_socket}", f"--key-file={k / 'munge.key'}",
                f"--log-file={k / 'munged.log'}", f"--seed-file={k / 'munged.seed'}",
                f"--pid-file={munge_socket.parent / 'munged.pid'}",
            ],
            user="munge", group="munge", extra_groups=[],
        )  # fmt: skip
        self._wait(munge_socket.exists, timeout, "munged to create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D"])
        self._wait(lambda: self._ok(["scontrol", "ping"]), timeout, "slurmctld to answer")
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
        self._wait(lambda: self.node_state() == "idle", timeout, "the node to be idle")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, wait for them to leave the node, stop the daemons, remove files."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._ok(["scancel", "--full", "--user", "root"])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.active_jobs():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """SIGKILL job processes that outlived the daemons: their command line names our folder."""
        mine = str(self.root).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if mine in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)

    # ---- clients ---------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        env.update(extra)
        return env

    def run(
        self, cmd: list[str], *, timeout: float = 30, env: dict[str, str] | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command to completion, killing its process group at ``timeout``."""
        proc = subprocess.Popen(
            cmd,
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kw,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise TimeoutError(f"{' '.join(cmd)} ran past {timeout} s\n{out}\n{err}") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return self.run(cmd, timeout=15).returncode == 0
        except TimeoutError:
            return False

    def node_state(self) -> str:
        try:
            res = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=15)
        except TimeoutError:
            return ""
        return res.stdout.strip()

    def sbatch(
        self, script: Path, args: list[str], options: list[str], env: dict[str, str], cwd: Path
    ) -> int:
        res = self.run(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Job:
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        fields = dict(
            item.split("=", 1) for item in res.stdout.split() if "=" in item and item[0].isupper()
        )
        return Job(
            job_id,
            fields.get("JobState", "UNKNOWN"),
            fields.get("Reason", ""),
            int(fields.get("Restarts", "0")),
            fields.get("ExitCode", ""),
            fields.get("TimeLimit", ""),
        )

    def active_jobs(self) -> list[str]:
        """Jobs pending, running or completing (squeue's default states)."""
        res = self.run(["squeue", "-h", "-o", "%i %T"])
        return [line for line in res.stdout.splitlines() if line.strip()]

    def gone(self, job_id: int) -> bool:
        """True once the job has left the node: not pending, running or completing."""
        return not any(line.split()[0] == str(job_id) for line in self.active_jobs())

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float) -> Job:
        """Wait until the job is in one of ``states`` (and, for an end state, has left the node)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in states and (job.state not in TERMINAL or self.gone(job_id)):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        """The daemons' recent log lines, for failure messages."""
        parts = []
        for f in sorted(self.logs.glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- helpers ---------------------------------------------------------------------------
    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"{timeout} s passed"
                raise RuntimeError(f"waiting for {what}: {why}\n{self.log_tail()}")
            time.sleep(0.2)

"""Test hooks: fault injection for tests and drills, read from the environment in one place.

- ``LEPTON_FAULT="delay=0.01,raise=1@30,skew=2@10"`` (``FaultHooks``, used by the training
  step): sleep 0.01 s before every step (to make a short run long enough to interrupt); raise an
  unexpected error on rank 1 at step 30; make rank 2 report a wrong step counter at step 10 (the
  per-step consistency check must catch it). ``raise=`` may be given more than once; with
  ``once=DIR`` each injected error fires on one attempt only (its marker ``DIR/raise-R@S`` is
  claimed atomically before it fires), so a job restarted by ``lepton launch`` gets past it.
  ``delay=0.05@1`` sleeps on rank 1 only (a straggler); ``watchdog_scale=0.01`` multiplies the
  "auto" watchdog's fixed constants (start-up limit, floor): a frozen rank is caught in seconds.
  ``slow=F@RANK`` (F >= 1) makes rank RANK a node F times slower: after each gradient kernel
  call it sleeps (F - 1) times the call's measured seconds, inside the timed step compute, so
  its cost scales with its rows (for ``data.balance = "speed"``).
- ``LEPTON_FAIL_ONCE=<dir>`` (``FailOnce``, used by the task farm): every task fails on its
  first attempt only, so retries can be tested on real jobs.

``load`` reads and checks both variables once, at start-up (``lepton_hpc.cli`` calls it on every
rank; a malformed value is one error line naming the variable); everything else asks
``hooks()`` for the parsed values and never reads the environment itself. Each rank applies the
hooks on its own from its own copy (mpiexec gives every rank the same environment): nothing about
them travels in the task farm's messages.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .comm.base import Communicator
from .errors import LeptonError

FAULT_ENV = "LEPTON_FAULT"
FAIL_ONCE_ENV = "LEPTON_FAIL_ONCE"
FAULT_SYNTAX = (
    "delay=SECONDS[@RANK],raise=RANK@STEP,skew=RANK@STEP,once=DIR,watchdog_scale=F,slow=F@RANK"
)


class HookError(LeptonError):
    """A test-hook variable with a value that cannot be parsed (every rank reads the same)."""

    collective = True

    def __init__(self, variable: str, value: str, message: str) -> None:
        super().__init__(f"{variable}={value!r}: {message}")
        self.variable = variable


class FaultHooks:
    """``LEPTON_FAULT`` parsed: applied by the training step before every step (off when empty).

    ``FaultHooks.from_env()`` returns the values ``load`` read at start-up.
    """

    def __init__(self, spec: str = "") -> None:
        self.spec = spec
        self.delay = 0.0
        self.delay_rank: int | None = None  # None: every rank sleeps
        self.watchdog_scale = 1.0
        self.raises: tuple[tuple[int, int], ...] = ()
        self.skew_at: tuple[int, int] | None = None
        self.once: Path | None = None
        self.slow: tuple[float, int] | None = None  # (factor, rank)
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition("=")
            if key == "delay":
                seconds, at, rank = value.partition("@")
                if at and not rank.isdigit():
                    raise HookError(FAULT_ENV, spec, f"delay={value!r} is not SECONDS[@RANK]")
                self.delay = _seconds(spec, seconds)
                self.delay_rank = int(rank) if at else None
            elif key == "watchdog_scale":
                self.watchdog_scale = _seconds(spec, value, key)
                if self.watchdog_scale == 0:
                    raise HookError(FAULT_ENV, spec, "watchdog_scale must be > 0")
            elif key == "raise":
                self.raises += (_rank_at_step(spec, key, value),)
            elif key == "skew":
                self.skew_at = _rank_at_step(spec, key, value)
            elif key == "slow":
                self.slow = _slow(spec, value)
            elif key == "once":
                if not value:
                    raise HookError(FAULT_ENV, spec, "once= needs a directory (of fault markers)")
                self.once = Path(value)
            else:
                raise HookError(FAULT_ENV, spec, f"unknown fault {key!r} (known: {FAULT_SYNTAX})")

    @classmethod
    def from_env(cls) -> FaultHooks:
        """The ``LEPTON_FAULT`` hooks read once at start-up (see ``load``)."""
        return hooks().faults

    @property
    def raise_at(self) -> tuple[int, int] | None:
        """The first ``raise=`` (None when there is none)."""
        return self.raises[0] if self.raises else None

    def __bool__(self) -> bool:
        return bool(
            self.delay or self.raises or self.skew_at or self.watchdog_scale != 1.0 or self.slow
        )

    def slow_factor(self, rank: int) -> float:
        """How many times slower ``slow=F@RANK`` makes this rank's step compute (1.0: not)."""
        return self.slow[0] if self.slow is not None and self.slow[1] == rank else 1.0

    def before_step(self, rank: int, step: int) -> int:
        """Apply the faults for this (rank, step); returns the step counter to report."""
        if self.delay and self.delay_rank in (None, rank):
            time.sleep(self.delay)
        if (rank, step) in self.raises and self._fires(rank, step):
            raise RuntimeError(f"injected fault ({FAULT_ENV}) on rank {rank} at step {step}")
        return step + 1 if self.skew_at == (rank, step) else step

    def _fires(self, rank: int, step: int) -> bool:
        """True unless ``once=DIR`` is set and an earlier attempt already claimed this fault."""
        if self.once is None:
            return True
        self.once.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.once / f"raise-{rank}@{step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True


def _seconds(spec: str, value: str, key: str = "delay") -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise HookError(FAULT_ENV, spec, f"{key}={value!r} is not a number of seconds >= 0")
    return seconds


def _slow(spec: str, value: str) -> tuple[float, int]:
    factor, at, rank = value.partition("@")
    try:
        f = float(factor)
    except ValueError:
        f = math.nan
    if not (at and rank.isdigit() and math.isfinite(f) and f >= 1):
        raise HookError(FAULT_ENV, spec, f"slow={value!r} is not slow=F@RANK with a factor F >= 1")
    return f, int(rank)


def _rank_at_step(spec: str, key: str, value: str) -> tuple[int, int]:
    rank, at, step = value.partition("@")
    if not (at and rank.isdigit() and step.isdigit()):
        raise HookError(FAULT_ENV, spec, f"{key}={value!r} is not {key}=RANK@STEP")
    return int(rank), int(step)


class InjectedFailure(RuntimeError):
    """Raised by the ``LEPTON_FAIL_ONCE`` test hook; retried like any unexpected failure."""


class FailOnce:
    """``LEPTON_FAIL_ONCE=<dir>``: each task fails on its first attempt only.

    A task fails if ``<dir>/<task id>`` does not exist, and creates it (atomically, so exactly one
    attempt claims it); the retry then finds the marker and runs. Create a task's marker before
    the run to spare it. ``decide`` is called by every rank of the task's group, so the whole
    group fails together without any message about the hook (the directory is on a file system
    all ranks see, like the rest of a job's files).
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory else None

    @classmethod
    def from_env(cls) -> FailOnce:
        """The ``LEPTON_FAIL_ONCE`` hook read once at start-up (see ``load``)."""
        return hooks().fail_once

    def __bool__(self) -> bool:
        return self.directory is not None

    def claim(self, task_id: str) -> bool:
        """True when this attempt of ``task_id`` must fail (its marker did not exist yet)."""
        if self.directory is None:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.directory / task_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def decide(self, task_id: str, comm: Communicator) -> bool:
        """``claim`` for a group: every rank of ``comm`` gets the same answer.

        Each rank looks for the marker, all wait at a barrier, then the group's rank 0 claims
        it: nobody can see the marker appear between the look and the claim.
        """
        if self.directory is None:
            return False
        fresh = not (self.directory / task_id).exists()
        comm.barrier()
        if comm.is_root and fresh:
            self.claim(task_id)
        return fresh


@dataclass(frozen=True, slots=True)
class Hooks:
    """The test hooks of this process, as read from the environment."""

    faults: FaultHooks
    fail_once: FailOnce
    settings: tuple[tuple[str, str], ...] = ()  # (variable, value) of each one set

    @property
    def active(self) -> bool:
        return bool(self.settings)

    def announcement(self) -> str:
        """One line naming the active hooks ("" when none), for the log at start-up."""
        if not self.settings:
            return ""
        return "test hooks active: " + " ".join(f"{k}={v}" for k, v in self.settings)


def parse(environ: Mapping[str, str]) -> Hooks:
    """The hooks set in ``environ``; a malformed value raises ``HookError``."""
    fault = environ.get(FAULT_ENV, "")
    fail_once = environ.get(FAIL_ONCE_ENV, "")
    if fail_once and Path(fail_once).exists() and not Path(fail_once).is_dir():
        raise HookError(FAIL_ONCE_ENV, fail_once, "is not a directory (of per-task markers)")
    settings = tuple((k, v) for k, v in ((FAULT_ENV, fault), (FAIL_ONCE_ENV, fail_once)) if v)
    return Hooks(FaultHooks(fault), FailOnce(fail_once or None), settings)


_current: dict[str, Hooks] = {}  # "hooks": what ``load`` read


def load(environ: Mapping[str, str] | None = None) -> Hooks:
    """Read the hooks from ``environ`` (default: this process's environment) and keep them."""
    _current["hooks"] = parse(os.environ if environ is None else environ)
    return _current["hooks"]


def hooks() -> Hooks:
    """The hooks read by ``load``; read now if nothing called it (a library use without the CLI)."""
    return _current["hooks"] if "hooks" in _current else load()

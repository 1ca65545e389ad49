"""What the task farm moves around: tasks, attempt reports, final results, and the test hook.

A ``Task`` is an id plus a picklable payload; the function that runs it is the same on every
rank (the program is SPMD), so only tasks and reports cross the wire, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..comm.base import Communicator
from ..log import Log

FAIL_ONCE_ENV = "LEPTON_FAIL_ONCE"


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work: a unique ``id`` and the ``payload`` the task function reads."""

    id: str
    payload: Any = None

    @property
    def key(self) -> str:
        """A digest of the payload: the journal skips a task only if its key is unchanged."""
        text = json.dumps(self.payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


TaskFunction = Callable[[Task, Communicator, Log], Any]
"""Runs one task on the ranks of a worker group; returns a small JSON-able value."""


@dataclass(slots=True)
class Report:
    """One attempt's outcome, sent by a group leader to the coordinator."""

    task_id: str
    attempt: int
    ok: bool
    value: Any = None
    error: str = ""
    retryable: bool = True  # False for user errors (LeptonError): they would fail again
    seconds: float = 0.0


@dataclass(slots=True)
class TaskResult:
    """The final outcome of a task after all its attempts (or as read back from the journal)."""

    id: str
    status: str  # "ok" or "failed"
    value: Any = None
    error: str = ""
    attempts: int = 0
    workers: list[int] = field(default_factory=list)  # world rank of the leader, per attempt
    seconds: float = 0.0  # summed over attempts
    from_journal: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def retried(self) -> bool:
        return self.attempts > 1

    def to_record(self, key: str) -> dict[str, Any]:
        """The journal line of this result."""
        return {
            "id": self.id,
            "key": key,
            "status": self.status,
            "attempts": self.attempts,
            "workers": self.workers,
            "seconds": round(self.seconds, 6),
            "error": self.error,
            "value": self.value,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TaskResult:
        return cls(
            id=record["id"],
            status=record["status"],
            value=record.get("value"),
            error=record.get("error", ""),
            attempts=int(record.get("attempts", 1)),
            workers=list(record.get("workers", [])),
            seconds=float(record.get("seconds", 0.0)),
            from_journal=True,
        )


class InjectedFailure(RuntimeError):
    """Raised by the ``LEPTON_FAIL_ONCE`` test hook; retried like any unexpected failure."""


class FailOnce:
    """Test hook: ``LEPTON_FAIL_ONCE=<dir>`` makes each task fail on its first attempt only.

    A task fails if ``<dir>/<task id>`` does not exist, and creates it (atomically, so exactly one
    attempt claims it); the retry then finds the marker and runs. Create a task's marker before
    the run to spare it. The group leader decides and broadcasts, so a whole group fails together.
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory else None

    @classmethod
    def from_env(cls) -> FailOnce:
        return cls(os.environ.get(FAIL_ONCE_ENV) or None)

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

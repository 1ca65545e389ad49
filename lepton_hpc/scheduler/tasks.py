"""What the task farm moves around: tasks, attempt reports and final results.

A ``Task`` is an id plus a picklable payload; the function that runs it is the same on every
rank (the program is SPMD), so only tasks and reports cross the wire, never code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..comm.base import Communicator
from ..log import Log


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

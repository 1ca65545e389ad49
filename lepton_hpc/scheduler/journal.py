"""The journal of finished tasks: one JSON line per result, appended and fsynced by rank 0.

A rerun of the same work reads it and skips every task whose last record is ``ok`` with an
unchanged key (payload digest); failed, missing and changed tasks run again. Each record is
written with a single ``write`` on an ``O_APPEND`` descriptor and fsynced before the coordinator
moves on, so a job killed at any moment leaves whole lines plus at most one torn last line, which
``read`` ignores and the next append starts after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .tasks import Task, TaskResult


class Journal:
    """Append-only record of task results in ``path`` (JSON lines)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def read(self) -> dict[str, dict[str, Any]]:
        """The last whole record of each task id (a torn or garbled line is skipped)."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and "status" in record:
                records[record["id"]] = record
        return records

    def finished(self, tasks: list[Task]) -> dict[str, TaskResult]:
        """Results of the ``tasks`` already done with the same key, by task id."""
        records = self.read()
        done = {}
        for task in tasks:
            record = records.get(task.id)
            if record and record["status"] == "ok" and record.get("key") == task.key:
                done[task.id] = TaskResult.from_record(record)
        return done

    def append(self, result: TaskResult, key: str) -> None:
        """Write one record durably (fsync) before returning."""
        line = json.dumps(result.to_record(key), default=str) + "\n"
        if self._fd is None:
            self._open()
        assert self._fd is not None
        os.write(self._fd, line.encode())
        os.fsync(self._fd)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new:  # make the new file's name durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        elif self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            os.write(self._fd, b"\n")  # a torn last line from a killed run: start a fresh one

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

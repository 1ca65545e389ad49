"""The coordinator's bookkeeping: which task goes to which idle worker, and what to retry.

Pure Python, no MPI, so the policy is unit-tested on its own:
- dynamic assignment: a task goes to whichever worker is idle first; nothing is planned ahead,
  so a slow task or a slow node holds up only its own worker;
- retries: a failed attempt goes back to the front of the queue, up to ``retries`` more times,
  and is given to a worker that has not tried it yet whenever one exists; it waits for such a
  worker rather than run again where it just failed;
- user errors (``Report.retryable`` False) are not retried: they would fail the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .tasks import Report, Task, TaskResult


@dataclass(slots=True)
class Attempt:
    """A task on its way: the attempt number (1-based) and the workers that already tried it."""

    task: Task
    number: int = 1
    tried: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def may_run_on(self, worker: int, workers: Iterable[int]) -> bool:
        untried = [w for w in workers if w not in self.tried]
        return worker not in self.tried or not untried


class TaskQueue:
    """Pending tasks, idle and busy workers, and the results so far."""

    def __init__(self, tasks: Iterable[Task], workers: Iterable[int], retries: int) -> None:
        self.workers = list(workers)
        if not self.workers:
            raise ValueError("a task queue needs at least one worker")
        self.retries = retries
        self.tasks = {t.id: t for t in tasks}
        self.pending: deque[Attempt] = deque(Attempt(t) for t in self.tasks.values())
        self.idle: deque[int] = deque(self.workers)
        self.running: dict[int, Attempt] = {}
        self.results: dict[str, TaskResult] = {}

    @property
    def finished(self) -> bool:
        return not self.pending and not self.running

    def assign(self) -> list[tuple[int, Attempt]]:
        """Hand pending tasks to idle workers, longest-idle worker first."""
        handed = []
        for worker in list(self.idle):
            attempt = next((a for a in self.pending if a.may_run_on(worker, self.workers)), None)
            if attempt is None:
                continue
            self.pending.remove(attempt)
            self.idle.remove(worker)
            attempt.tried.append(worker)
            self.running[worker] = attempt
            handed.append((worker, attempt))
        return handed

    def complete(self, worker: int, report: Report) -> tuple[TaskResult | None, Attempt | None]:
        """Record ``worker``'s report; returns (final result, None) or (None, the retry queued)."""
        attempt = self.running.pop(worker)
        if attempt.task.id != report.task_id:
            raise RuntimeError(
                f"worker {worker} reported {report.task_id}, was given {attempt.task.id}"
            )
        self.idle.append(worker)
        attempt.seconds += report.seconds
        if not report.ok and report.retryable and attempt.number <= self.retries:
            retry = Attempt(attempt.task, attempt.number + 1, attempt.tried, attempt.seconds)
            self.pending.appendleft(retry)
            return None, retry
        result = TaskResult(
            id=attempt.task.id,
            status="ok" if report.ok else "failed",
            value=report.value,
            error=report.error,
            attempts=attempt.number,
            workers=list(attempt.tried),
            seconds=attempt.seconds,
        )
        self.results[result.id] = result
        return result, None

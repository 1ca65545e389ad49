"""Progress of a task farm on rank 0: done, running, failed, retried and an estimate of time left.

On a terminal one status line is redrawn in place (at most every ``REDRAW_S``); when the output
is a file or a pipe (batch jobs) there is no redrawing: one plain line per finished, failed or
retried task, which reads well in a job log.
"""

from __future__ import annotations

import os
import time
from typing import TextIO

from .tasks import TaskResult

REDRAW_S = 0.5


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` reaches a person's terminal.

    Open MPI gives its ranks a pseudo-terminal as stdout whatever mpiexec's own output is, so
    under it the answer is that of mpiexec's stdout (the parent process on rank 0's node).
    """
    if not stream.isatty():
        return False
    if "OMPI_COMM_WORLD_RANK" not in os.environ:
        return True
    try:
        target = os.readlink(f"/proc/{os.getppid()}/fd/1")
    except OSError:
        return False
    return target.startswith(("/dev/pts/", "/dev/tty"))


class Progress:
    """Counts and the display; call ``started``/``finished``/``retrying`` from the coordinator."""

    def __init__(
        self,
        title: str,
        total: int,
        workers: int,
        stream: TextIO,
        *,
        skipped: int = 0,
        interactive: bool | None = None,
    ) -> None:
        self.title = title
        self.total = total
        self.workers = max(workers, 1)
        self.stream = stream
        self.interactive = is_terminal(stream) if interactive is None else interactive
        self.done = skipped
        self.failed = 0
        self.retried = 0
        self.running = 0
        self._durations: list[float] = []
        self._t0 = time.monotonic()
        self._last_draw = 0.0

    # ---- events --------------------------------------------------------------------------
    def started(self) -> None:
        self.running += 1
        self._draw()

    def retrying(self, task_id: str, attempt: int, error: str) -> None:
        self.running -= 1
        self.retried += 1
        self._event(f"{task_id} failed ({error}); retry {attempt - 1}")

    def finished(self, result: TaskResult) -> None:
        self.running -= 1
        self._durations.append(result.seconds)
        if result.ok:
            self.done += 1
            note = f" after {result.attempts} attempts" if result.retried else ""
            self._event(f"{result.id} done in {result.seconds:.1f} s{note}")
        else:
            self.failed += 1
            self._event(f"{result.id} FAILED after {result.attempts} attempt(s): {result.error}")

    def close(self) -> None:
        """The final summary line (a newline ends the redrawn line on a terminal)."""
        if self.interactive:
            self._draw(force=True)
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.title}: {self.summary()}\n")
        self.stream.flush()

    # ---- display -------------------------------------------------------------------------
    def seconds_left(self) -> float | None:
        """Mean task time x tasks left / workers; None before the first task finished."""
        left = self.total - self.done - self.failed
        if left <= 0:
            return 0.0
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        return mean * max(left, 0) / self.workers

    def summary(self) -> str:
        eta = self.seconds_left()
        left = "?" if eta is None else f"{eta:.0f} s"
        return (
            f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
            f"{self.retried} retried, ~{left} left ({time.monotonic() - self._t0:.0f} s elapsed)"
        )

    def _event(self, message: str) -> None:
        if self.interactive:
            self._draw(force=True)
        else:
            self.stream.write(f"{self.title}: {message} [{self.summary()}]\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interactive or (not force and now - self._last_draw < REDRAW_S):
            return
        self._last_draw = now
        self.stream.write(f"\r\x1b[2K{self.title}: {self.summary()}")
        self.stream.flush()

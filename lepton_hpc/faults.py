"""Signals and the progress watchdog: how a job stops cleanly or ends instead of hanging.

Signal handlers only set a flag; the engine folds the flag into its per-step allreduce, so all
ranks agree at the same step boundary to checkpoint and stop. The watchdog is a thread that ends
the whole job (MPI Abort) when the step counter has not moved for ``timeout`` seconds — MPI has
no timeout on collectives, so a frozen rank would otherwise hang every other rank forever.
``FaultHooks`` (the ``LEPTON_FAULT`` test hook) lives in ``lepton_hpc.testhooks``; it is named
here too because the training step takes it with the signals and the watchdog.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from .testhooks import FaultHooks

__all__ = ["STOP_SIGNALS", "FaultHooks", "StopFlag", "Watchdog"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM or SIGUSR1; read at each step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGUSR1 (once: a second call keeps the original handlers)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum != 0


class Watchdog:
    """Calls ``on_timeout(step, idle_seconds)`` once when ``beat`` has not been called in time."""

    def __init__(self, timeout: float, on_timeout: Callable[[int, float], None]) -> None:
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.step = 0
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._run, name="lepton-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self.step = step
        self._last = time.monotonic()

    def pause(self) -> None:
        """Stop watching (long single-rank work such as writing outputs at the end)."""
        self._done.set()

    def _run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._done.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self.on_timeout(self.step, idle)
                return

"""Signals and the progress watchdog: how a job stops cleanly or ends instead of hanging.

Signal handlers only set a flag; the engine folds the flag into its per-step allreduce, so all
ranks agree at the same step boundary to checkpoint and stop. The watchdog is a thread that ends
the whole job (MPI Abort) when the step counter has not moved for its limit — MPI has no
timeout on collectives, so a frozen rank would otherwise hang every other rank forever. The
limit is a fixed number of seconds, or ``"auto"`` (the default, ``auto_limit``): learned from
the step times this process has seen, with a floor, and a start-up limit before that.
``FaultHooks`` (the ``LEPTON_FAULT`` test hook) lives in ``lepton_hpc.testhooks``; it is named
here too because the training step takes it with the signals and the watchdog.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Callable

from .testhooks import FaultHooks

__all__ = ["STOP_SIGNALS", "FaultHooks", "StopFlag", "Stragglers", "Watchdog", "auto_limit"]

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


# "auto" watchdog constants (seconds, before ``scale``). They must never fire on a healthy run:
# the first steps of a process compile the kernels (JIT), so until AUTO_WARMUP_STEPS steps have
# been seen every step gets AUTO_STARTUP_S; then a step gets AUTO_MULTIPLE times the slowest
# step seen since, but never less than AUTO_FLOOR_S. Work between steps that is not a step
# (evaluation, checkpoint writes, the epoch's bookkeeping) runs inside ``Watchdog.hold`` and
# gets max(AUTO_STARTUP_S, AUTO_MULTIPLE x the slowest such phase seen).
AUTO_STARTUP_S = 600.0
AUTO_FLOOR_S = 120.0
AUTO_MULTIPLE = 20.0
AUTO_WARMUP_STEPS = 5


def auto_limit(slowest_s: float, seen: int, *, scale: float = 1.0, hold: bool = False) -> float:
    """The ``"auto"`` limit after ``seen`` steps (or held phases) whose slowest took ``slowest_s``.

    ``scale`` multiplies the fixed constants (start-up and floor), never the multiple of the
    observed time (a test hook shortens them; the learned part stays generous)."""
    if hold:
        return max(AUTO_STARTUP_S * scale, AUTO_MULTIPLE * slowest_s)
    if seen < AUTO_WARMUP_STEPS:
        return AUTO_STARTUP_S * scale
    return max(AUTO_FLOOR_S * scale, AUTO_MULTIPLE * slowest_s)


class Watchdog:
    """Calls ``on_timeout(step, idle_seconds)`` once when ``beat`` has not been called in time.

    ``timeout``: seconds (0 = off) or ``"auto"`` (``auto_limit``; ``scale`` shortens its
    constants for tests). ``on_arm(limit)`` is called once, from ``beat``, when the auto limit
    first rests on observed step times. What is measured is the time since the last ``beat``
    (the step counter advancing); ``hold()`` wraps work between steps (evaluation, checkpoints)
    that is timed and limited apart from the steps, and feeds the watchdog when it ends.
    """

    def __init__(
        self,
        timeout: float | str,
        on_timeout: Callable[[int, float], None],
        *,
        scale: float = 1.0,
        on_arm: Callable[[float], None] | None = None,
    ) -> None:
        self.auto = timeout == "auto"
        self.scale = scale
        self.on_timeout = on_timeout
        self.on_arm = on_arm
        self.step = 0
        self.steps_seen = 0  # step intervals observed (auto)
        self.slowest_step = 0.0  # slowest after the warm-up steps
        self.slowest_hold = 0.0
        self.armed = False
        self._held = False
        self.timeout = auto_limit(0.0, 0, scale=scale) if self.auto else float(timeout)
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.auto or self.timeout > 0

    def start(self) -> None:
        if self.enabled:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="lepton-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        now = time.monotonic()
        if self.auto:
            self.steps_seen += 1
            if self.steps_seen > AUTO_WARMUP_STEPS:  # compile-time steps do not set the scale
                if now - self._last > self.slowest_step:  # the limit moves only with it
                    self.slowest_step = now - self._last
                    self.timeout = auto_limit(self.slowest_step, self.steps_seen, scale=self.scale)
            else:
                self.timeout = auto_limit(self.slowest_step, self.steps_seen, scale=self.scale)
            if not self.armed and self.steps_seen >= AUTO_WARMUP_STEPS:
                self.armed = True
                if self.on_arm is not None:
                    self.on_arm(self.timeout)
        self.step = step
        self._last = now

    def hold(self) -> _Hold:
        """``with watchdog.hold():`` around non-step work; it has its own (auto) limit."""
        return _Hold(self)

    def limit(self) -> float:
        """The limit that applies now (held phases: their own under "auto")."""
        if self._held and self.auto:
            return auto_limit(self.slowest_hold, 0, scale=self.scale, hold=True)
        return self.timeout

    def pause(self) -> None:
        """Stop watching (long single-rank work such as writing outputs at the end)."""
        self._done.set()

    def _run(self) -> None:
        period = min(1.0, max(self.timeout, 0.04) / 4)
        while not self._done.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.limit():
                self.on_timeout(self.step, idle)
                return


class _Hold:
    """The context of ``Watchdog.hold`` (re-entrant: only the outermost one counts)."""

    def __init__(self, watchdog: Watchdog) -> None:
        self.w = watchdog
        self.outer = False

    def __enter__(self) -> None:
        w = self.w
        self.outer = not w._held
        if self.outer:
            w._last = time.monotonic()  # the step before it ended in time: it was fed
            w._held = True

    def __exit__(self, *exc) -> None:
        w = self.w
        if self.outer:
            now = time.monotonic()
            w.slowest_hold = max(w.slowest_hold, now - w._last)
            w._last = now
            w._held = False


# A straggler: a rank whose step work in an epoch (its time in the steps outside the reduction)
# is over STRAGGLER_RATIO times the median of the other ranks' and at least STRAGGLER_MARGIN_S
# longer, for STRAGGLER_EPOCHS epochs in a row (the margin keeps tiny epochs quiet).
STRAGGLER_RATIO = 1.5
STRAGGLER_MARGIN_S = 1.0
STRAGGLER_EPOCHS = 2


def slow_ranks(work_s: list[float]) -> list[int]:
    """Ranks whose ``work_s`` is far above the median of the others' (see STRAGGLER_RATIO)."""
    slow = []
    for rank, mine in enumerate(work_s):
        others = work_s[:rank] + work_s[rank + 1 :]
        if not others:
            continue
        median = statistics.median(others)
        if mine > STRAGGLER_RATIO * median and mine - median > STRAGGLER_MARGIN_S:
            slow.append(rank)
    return slow


class Stragglers:
    """Counts, per rank, the epochs in a row it was slow; ``update`` returns the ranks to name.

    Fed once per epoch with every rank's step work (the same list on every rank), so every rank
    reaches the same verdict; a rank is named once per run of slow epochs."""

    def __init__(self) -> None:
        self.streak: dict[int, int] = {}

    def update(self, work_s: list[float]) -> list[int]:
        slow = set(slow_ranks(work_s))
        self.streak = {r: self.streak.get(r, 0) + 1 for r in slow}
        return sorted(r for r, n in self.streak.items() if n == STRAGGLER_EPOCHS)

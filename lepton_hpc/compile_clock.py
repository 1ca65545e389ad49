"""Seconds this process has spent compiling Numba kernels, from Numba's own compile events.

Numba announces every compilation (not a load from its on-disk cache) as a ``numba:compile``
event. A kernel compiled for the first time compiles the kernels it calls inside its own event,
so only the outermost events are summed: the total is wall time, counted once. The listener is
installed once per process (``compile_clock()``) and costs nothing between compilations.
Compilation holds Numba's global compiler lock, so events never interleave between threads.
"""

from __future__ import annotations

import functools
import time


class CompileClock:
    """Running total of seconds spent inside outermost ``numba:compile`` events."""

    def __init__(self) -> None:
        self.seconds = 0.0  # compilations ended
        self.depth = 0  # compile events under way (0: nothing compiles; ``now()`` is ``seconds``)
        self._t0 = 0.0

    def start(self) -> None:
        if self.depth == 0:
            self._t0 = time.perf_counter()
        self.depth += 1

    def end(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self._t0

    def now(self) -> float:
        """Seconds compiled so far, including a compilation still under way."""
        running = time.perf_counter() - self._t0 if self.depth else 0.0
        return self.seconds + running


@functools.cache
def compile_clock() -> CompileClock:
    """The process's clock; the first call registers it with Numba's event system."""
    from numba.core import event

    clock = CompileClock()

    class _Listener(event.Listener):
        def on_start(self, ev: event.Event) -> None:  # noqa: ARG002
            clock.start()

        def on_end(self, ev: event.Event) -> None:  # noqa: ARG002
            clock.end()

    event.register("numba:compile", _Listener())
    return clock

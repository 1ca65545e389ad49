"""The progress watchdog ("auto" limit, arming, holds) and the straggler rule, without MPI."""

import time

import pytest

from lepton_hpc import faults
from lepton_hpc.faults import Stragglers, Watchdog, auto_limit, slow_ranks


def test_auto_limit_startup_then_multiple_with_a_floor():
    startup, floor, k = faults.AUTO_STARTUP_S, faults.AUTO_FLOOR_S, faults.AUTO_MULTIPLE
    assert auto_limit(0.0, 0) == startup
    assert auto_limit(50.0, faults.AUTO_WARMUP_STEPS - 1) == startup  # compiling: not yet armed
    assert auto_limit(0.01, faults.AUTO_WARMUP_STEPS) == floor
    assert auto_limit(30.0, 100) == k * 30.0
    assert auto_limit(0.01, 100, scale=0.01) == pytest.approx(floor * 0.01)
    assert auto_limit(30.0, 100, scale=0.01) == k * 30.0  # the learned part is never scaled
    assert auto_limit(0.0, 0, hold=True) == startup
    assert auto_limit(100.0, 0, hold=True) == k * 100.0
    assert floor >= 60 and startup >= floor and k >= 10  # generous: never fires on health


def test_fixed_and_off():
    assert Watchdog(3.0, lambda *a: None).timeout == 3.0
    off = Watchdog(0.0, lambda *a: None)
    off.start()
    assert not off.enabled and off._thread is None


def test_auto_arms_after_the_warmup_steps_and_logs_once():
    armed = []
    w = Watchdog("auto", lambda *a: None, on_arm=armed.append)
    assert w.enabled and w.timeout == faults.AUTO_STARTUP_S
    for step in range(1, faults.AUTO_WARMUP_STEPS):
        w.beat(step)
    assert not armed and not w.armed
    w.beat(faults.AUTO_WARMUP_STEPS)
    assert armed == [faults.AUTO_FLOOR_S] and w.timeout == faults.AUTO_FLOOR_S
    for step in range(10):
        w.beat(100 + step)
    assert len(armed) == 1


def test_slow_steps_after_warmup_raise_the_limit():
    w = Watchdog("auto", lambda *a: None, scale=1e-4)
    for step in range(faults.AUTO_WARMUP_STEPS + 1):
        w._last -= 0.5 if step == faults.AUTO_WARMUP_STEPS else 0.0  # one 0.5 s step
        w.beat(step)
    assert w.slowest_step >= 0.5 and w.timeout >= faults.AUTO_MULTIPLE * 0.5


def test_the_auto_limit_is_the_slowest_steps_after_every_beat():
    """The limit is recomputed only when the slowest step moves: it is still, after every
    beat, ``auto_limit`` of the slowest step so far (faster steps leave it where it was)."""
    w = Watchdog("auto", lambda *a: None, scale=1e-4)
    for step, slow in enumerate([0, 0.9, 0, 0, 0, 0, 0.3, 0, 0.5, 0.1, 0, 0.2, 0.5]):
        w._last -= slow  # a step that took ``slow`` seconds more
        w.beat(step)
        assert w.timeout == faults.auto_limit(w.slowest_step, w.steps_seen, scale=1e-4)
    assert 0.5 <= w.slowest_step < 0.9  # the warm-up's slow step does not count


def test_a_frozen_step_fires_once_and_a_hold_has_its_own_limit():
    fired = []
    w = Watchdog("auto", lambda step, idle: fired.append((step, idle)), scale=0.002)
    w.start()  # start-up limit 1.2 s, floor 0.24 s
    for step in range(1, faults.AUTO_WARMUP_STEPS + 2):
        w.beat(step)
    with w.hold():  # evaluation: the start-up limit applies, not the step's
        assert w.limit() == pytest.approx(faults.AUTO_STARTUP_S * 0.002)
        time.sleep(0.6)
    assert not fired
    time.sleep(1.5)  # the step "froze"
    w.pause()
    assert len(fired) == 1 and fired[0][0] == faults.AUTO_WARMUP_STEPS + 1
    assert fired[0][1] > w.timeout


def test_slow_ranks_needs_ratio_and_margin():
    assert slow_ranks([1.0]) == []
    assert slow_ranks([1.0, 5.0]) == [1]  # 2 ranks: compared with the other one
    assert slow_ranks([0.1, 0.5]) == []  # 5 x slower but under the margin
    assert slow_ranks([10.0, 10.0, 14.0]) == []  # 1.4 x: not a straggler
    assert slow_ranks([10.0, 10.0, 16.0, 9.0]) == [2]


def test_stragglers_are_named_after_consecutive_slow_epochs_once():
    s = Stragglers()
    assert s.update([1.0, 5.0]) == []
    assert s.update([1.0, 5.0]) == [1]  # second epoch in a row
    assert s.update([1.0, 5.0]) == []  # named once per streak
    assert s.update([1.0, 1.0]) == []
    assert s.update([5.0, 1.0]) == []
    assert s.update([1.0, 5.0]) == []  # the streak was broken


def test_fault_hooks_per_rank_delay_and_watchdog_scale():
    from lepton_hpc.testhooks import FaultHooks, HookError

    hooks = FaultHooks("delay=0.2@1,watchdog_scale=0.01")
    assert (hooks.delay, hooks.delay_rank, hooks.watchdog_scale) == (0.2, 1, 0.01) and hooks
    t0 = time.perf_counter()
    assert hooks.before_step(0, 3) == 3
    assert time.perf_counter() - t0 < 0.1  # rank 0 does not sleep
    assert FaultHooks("delay=0.5").delay_rank is None and FaultHooks("").watchdog_scale == 1.0
    for bad in ("delay=0.1@x", "watchdog_scale=0", "watchdog_scale=-1"):
        with pytest.raises(HookError):
            FaultHooks(bad)

"""The load-balancing policy (``training/balance.py``), the ``slow=`` fault hook and the
``data.balance`` config checks, without MPI."""

import itertools
import time

import pytest

from lepton_hpc import testhooks
from lepton_hpc.config import Config, check_config, config_from_dict
from lepton_hpc.data.reader import aligned_row_block, global_block_rows, row_block
from lepton_hpc.errors import ConfigError
from lepton_hpc.training.balance import (
    decide,
    even_ranges,
    proportional_cuts,
    speeds,
    window_speeds,
)


def test_cuts_are_proportional_contiguous_and_cover_everything():
    assert proportional_cuts(100, [1, 1], 1) == [0, 50, 100]
    assert proportional_cuts(90, [2, 1], 1) == [0, 60, 90]
    cuts = proportional_cuts(64, [1.0, 3.0, 1.0], 1)
    assert cuts[0] == 0 and cuts[-1] == 64 and cuts == sorted(cuts)
    assert [b - a for a, b in itertools.pairwise(cuts)] == [13, 38, 13]


def test_every_rank_gets_at_least_the_minimum_when_there_are_enough_units():
    cuts = proportional_cuts(4, [1000.0, 1.0, 1.0, 1.0], 1)
    assert [b - a for a, b in itertools.pairwise(cuts)] == [1, 1, 1, 1]
    cuts = proportional_cuts(10, [1.0, 1.0, 1e-9], 1)
    assert min(b - a for a, b in itertools.pairwise(cuts)) == 1 and cuts[-1] == 10


def test_even_ranges_are_the_readers_split():
    n, p = 20001, 3
    assert even_ranges(n, p, False) == [row_block(n, r, p) for r in range(p)]
    br = global_block_rows(n)
    assert even_ranges(n, p, True) == [aligned_row_block(n, r, p, br) for r in range(p)]


def test_speeds_fill_a_rank_without_rows_or_time_with_the_median():
    assert speeds([1.0, 2.0, 0.0], [100, 100, 100]) == [100.0, 50.0, 75.0]
    assert speeds([0.0, 0.0], [0, 0]) is None
    history = [([1.0, 2.0], [100, 100]), ([1.0, 1.0], [100, 50])]
    assert window_speeds(history) == [100.0, 50.0]


def test_a_rank_twice_as_slow_gets_a_third_of_the_blocks():
    n = 64 * 313  # 64 blocks of 313 rows
    ranges = even_ranges(n, 2, True)
    d = decide(ranges, [2.0, 1.0], [n // 2, n // 2], n, 313)
    assert d is not None
    blocks = [(b - a) // 313 for a, b in d.new]
    assert blocks == [43, 21]
    assert d.new[0][0] == 0 and d.new[0][1] == d.new[1][0] and d.new[1][1] == n
    assert d.time_new < 0.9 * d.time_old


def test_no_move_without_a_predicted_gain_of_more_than_ten_percent():
    n = 10000
    ranges = even_ranges(n, 2, False)
    assert decide(ranges, [1.0, 1.0], [5000, 5000], n, None) is None
    assert decide(ranges, [1.05, 1.0], [5000, 5000], n, None) is None  # 2.4 %: not worth it
    assert decide(ranges, None, [5000, 5000], n, None) is None
    d = decide(ranges, [1.5, 1.0], [5000, 5000], n, None)
    assert d is not None and d.new == ((0, 6000), (6000, 10000))


def test_slow_hook_is_parsed_and_named():
    hooks = testhooks.parse({"LEPTON_FAULT": "slow=2.5@1"}).faults
    assert hooks and hooks.slow == (2.5, 1)
    assert hooks.slow_factor(1) == 2.5 and hooks.slow_factor(0) == 1.0
    assert testhooks.FaultHooks("").slow_factor(0) == 1.0


def test_slow_hook_sleeps_in_proportion_to_the_kernel():
    import numpy as np

    from lepton_hpc.training.step import StepContext

    class Comm:
        rank = 1

    class Device:
        def gradient(self, *args):
            time.sleep(0.02)

    ctx = StepContext(
        comm=Comm(),
        backend=None,
        device=Device(),
        sizes=np.array([1, 1]),
        act=0,
        head=0,
        l2_mask=np.zeros(2),
        timers=None,
        stop=None,
        hooks=testhooks.FaultHooks("slow=3@1"),
    )
    assert ctx.slow == 3.0
    t0 = time.perf_counter()
    ctx.kernel(None, None, None, None)
    assert time.perf_counter() - t0 >= 0.06


def _config(**sections) -> Config:
    raw = {"data": {"train": "d.h5", "balance": "speed"}, "train": {"batch_size": 0}}
    for key, body in sections.items():
        raw.setdefault(key, {}).update(body)
    return check_config(config_from_dict(raw))


def test_balance_config_values_and_refusals():
    assert _config().data.balance == "speed"
    assert _config(optim={"name": "lbfgs"}, model={"kind": "logistic"}).data.balance == "speed"
    assert _config(train={"batch_size": 32}).data.balance == "speed"  # mini-batches too
    with pytest.raises(ConfigError, match=r"data\.balance"):
        _config(data={"balance": "fast"})
    refused = [
        ({"data": {"stream": True}}, "data.stream"),
        ({"comm": {"strategy": "overlap"}}, "sync"),
        (
            {
                "model": {"kind": "mlp", "hidden": [4], "parallel": "tensor"},
                "comm": {"tensor_ranks": 2},
            },
            "tensor",
        ),
    ]
    for sections, detail in refused:
        with pytest.raises(ConfigError) as err:
            _config(**sections)
        assert err.value.key == "data.balance" and detail in str(err.value)
        assert "\n" not in str(err.value)


def test_arrays_in_memory_are_refused():
    from lepton_hpc.training.setup import _balanceable

    _balanceable(_config(), None)
    with pytest.raises(ConfigError) as err:
        _balanceable(_config(), object())
    assert err.value.key == "data.balance" and "arrays in memory" in str(err.value)

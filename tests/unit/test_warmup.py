"""``lepton warmup`` and compile time in results.json.

The warm-up must compile exactly the signatures a real run uses (a real ``lepton train`` after it
compiles nothing), and compilation must be reported as ``timing.compile_s``, never as compute,
with the throughput computed without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_hpc.compile_clock import compile_clock
from lepton_hpc.results import build_results
from lepton_hpc.training.step import Timers
from tests.conftest import lepton, mpi_env, ok, run_mpi, write_config, write_h5

WARM_LOGISTIC = """
import sys, tempfile
from pathlib import Path
import numpy as np
from lepton_hpc.comm import world
from lepton_hpc.warmup import warm
with tempfile.TemporaryDirectory() as tmp:
    print("warm-up runs:", warm(world(), Path(tmp), dtypes=(np.float64,), kinds=("logistic",)))
"""


@pytest.mark.timeout(400)
def test_warmup_leaves_nothing_to_compile_for_a_real_run(tmp_path: Path) -> None:
    """A logistic float64 warm-up into an empty cache, then a real mini-batch run on other data
    (other size, rows, batch) with a validation split and a test file: only cache hits."""
    env = mpi_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    ok(run_mpi(1, ["-c", WARM_LOGISTIC], env=env, timeout=300))
    rng = np.random.default_rng(5)
    X = rng.standard_normal((700, 9))
    y = (X[:, 1] - X[:, 2] > 0).astype(np.float64)
    data = write_h5(tmp_path / "train.h5", X[:600], y[:600])
    test = write_h5(tmp_path / "test.h5", X[600:], y[600:])
    config = write_config(
        tmp_path / "run.toml",
        {
            "data": {
                "train": str(data),
                "test": str(test),
                "validation_fraction": 0.2,
                "scale": "zscore",
            },
            "model": {"kind": "logistic"},
            "optim": {"name": "adam", "lr": 0.05},
            "train": {"epochs": 2, "batch_size": 50},
            "output": {"dir": str(tmp_path / "run"), "plot": False},
        },
    )
    streamed = write_config(  # rows mapped from the file: read-only arrays, full batch
        tmp_path / "streamed.toml",
        {
            "data": {"train": str(data), "stream": True},
            "model": {"kind": "logistic"},
            "optim": {"name": "lbfgs"},
            "train": {"epochs": 2},
            "output": {"dir": str(tmp_path / "streamed"), "plot": False},
        },
    )
    for cfg, name in ((config, "run"), (streamed, "streamed")):
        res = ok(lepton(1, "train", cfg, env={**env, "NUMBA_DEBUG_CACHE": "1"}, timeout=120))
        out = res.stdout + res.stderr
        compiled = [line for line in out.splitlines() if "data saved" in line]
        assert compiled == [], f"{name} compiled after the warm-up:\n" + "\n".join(compiled)
        timing = json.loads((tmp_path / name / "results.json").read_text())["timing"]
        assert timing["compile_s"] < 0.5
        assert "compile" not in res.stdout.split("  time ")[1].splitlines()[0]
    assert "mapped from the file" in out


def test_throughput_leaves_out_compilation_in_the_loop() -> None:
    common = {
        "ranks": 1,
        "device": "cpu",
        "threads": 1,
        "epochs": 1,
        "steps": 3,
        "model": {},
        "n_params": 3,
        "rows_train": 300,
        "rows_val": 0,
        "metrics": {},
        "total_s": 5.0,
        "rows_seen": 300.0,
        "config": {},
    }
    seconds = {"compute": 0.5, "compile": 2.5, "compile_loop": 2.0}
    res = build_results(seconds=seconds, loop_s=3.0, **common)
    assert res["timing"]["compile_s"] == 2.5
    assert res["timing"]["compute_s"] == 0.5
    assert res["throughput"]["rows_per_s"] == pytest.approx(300.0)  # 300 rows in 3 - 2 s
    assert res["throughput"]["rows"] == 300.0
    assert res["throughput"]["s"] == pytest.approx(1.0)
    plain = build_results(seconds={"compute": 0.5}, loop_s=3.0, **common)
    assert plain["timing"]["compile_s"] == 0.0
    assert plain["throughput"]["rows_per_s"] == pytest.approx(100.0)


def test_timers_move_compilation_out_of_the_timed_work() -> None:
    """A kernel compiled inside ``compute`` (and inside a nested block): the compile time goes
    to ``compile`` once, what is left to ``compute`` is the block's time without it."""
    from numba import njit

    @njit  # a fresh function: compiled on first call, never from a cache
    def kernel(a):
        s = 0.0
        for v in a:
            s += v * v
        return s

    timers = Timers()
    clock = compile_clock()
    c0 = clock.seconds
    t0 = time.perf_counter()
    with timers("compute"), timers("inner"):
        assert kernel(np.arange(4.0)) == 14.0
    wall = time.perf_counter() - t0
    compiled = clock.seconds - c0
    assert compiled > 0.0
    assert timers.seconds["compile"] == pytest.approx(compiled)
    assert timers.seconds["compute"] + timers.seconds["compile"] <= wall + 1e-6
    assert timers.seconds["compute"] < wall - compiled + 1e-3
    with timers("compute"):  # compiled now: all of it is compute
        kernel(np.arange(4.0))
    assert timers.seconds["compile"] == pytest.approx(compiled)


def test_every_warmup_job_is_a_valid_config(tmp_path: Path) -> None:
    """``lepton warmup`` stops at its first refused job (and the install goes on with a cold
    cache): every job's config passes the checks a real run makes."""
    from lepton_hpc.config import check_config, config_from_dict
    from lepton_hpc.warmup import TASKS, _jobs

    files = {t: tmp_path / f"{t}.h5" for t, _ in TASKS}
    runs = _jobs(files)
    assert runs
    for run in runs:
        check_config(config_from_dict({**run, "output": {**run["output"], "dir": "x"}}))

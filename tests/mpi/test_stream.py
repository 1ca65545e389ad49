"""Streamed training (``data.stream``) under real ``mpiexec``: full-batch and L-BFGS runs give
the bits of the in-memory run in reproducible mode, at 1, 2 and 3 ranks, on a contiguous file,
a chunked gzip copy and shards, with a z-scored, validation-split, NaN-dropping config whose
pieces (``data.buffer_mb``) are far smaller than a rank's rows; metrics are equal too. Bad
configurations and bad rows fail with one line, as in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import lepton, mpi_env, ok, read_params, write_config
from tests.resume_checks import check_resumed, newest_valid

ROWS, FEATURES = 5_000, 6
BUFFER_MB = 0.01  # about 330 rows of 6 float32 + target: 5-16 pieces per rank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(contiguous file, chunked gzip copy, three shards of it), row 17 holding a NaN."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(11)
    X = (rng.normal(size=(ROWS, FEATURES)) * 3 + 1).astype(np.float32)
    y = (X @ rng.normal(size=FEATURES) + rng.normal(size=ROWS) > 0).astype(np.float64)
    X[17, 2] = np.nan
    with h5py.File(root / "one.h5", "w") as fh:
        fh["X"], fh["y"] = X, y
    with h5py.File(root / "gzip.h5", "w") as fh:
        fh.create_dataset("X", data=X, chunks=(100, FEATURES), compression="gzip")
        fh["y"] = y
    parts = []
    for i, (a, b) in enumerate([(0, 1234), (1234, 1240), (1240, ROWS)]):
        parts.append(root / f"part-{i}.h5")
        with h5py.File(parts[-1], "w") as fh:
            fh["X"], fh["y"] = X[a:b], y[a:b]
    return root / "one.h5", root / "gzip.h5", [str(p) for p in parts]


def _train(tmp_path, ranks, train, name, optim, *extra, stream=True, test=None):
    cfg = write_config(
        tmp_path / f"{name}.toml",
        {
            "data": {
                "train": train,
                **({"test": test} if test else {}),
                "validation_fraction": 0.2,
                "scale": "zscore",
                "nonfinite": "drop",
                "stream": stream,
                "buffer_mb": BUFFER_MB,
            },
            "model": {"kind": "logistic", "l2": 1e-3},
            "optim": optim,
            "train": {"epochs": 4},
            "comm": {"reproducible": True},
            "output": {"dir": str(tmp_path / name), "plot": False},
        },
    )
    res = ok(lepton(ranks, "train", cfg, *extra, timeout=120))
    run = tmp_path / name
    results = json.loads((run / "results.json").read_text())
    return read_params(run / "model.h5"), results, res


@pytest.mark.parametrize(
    "optim", [{"name": "lbfgs"}, {"name": "adam", "lr": 0.1}], ids=["lbfgs", "adam"]
)
def test_streamed_full_batch_is_bitwise_in_memory_at_1_2_3_ranks(tmp_path, data, optim):
    one, gz, parts = data
    test = str(gz)  # the test file is streamed too (scaled with the training scaler)
    want, results, _ = _train(tmp_path, 1, str(one), "memory", optim, stream=False, test=test)
    assert results["metrics"]["test"]["rows"] == ROWS - 1  # the NaN row dropped
    history = [json.loads(line) for line in (tmp_path / "memory" / "metrics.jsonl").open()]
    for ranks, train in ((1, str(one)), (2, str(gz)), (3, parts)):
        name = f"stream{ranks}"
        got, res, _ = _train(tmp_path, ranks, train, name, optim, test=test)
        assert np.array_equal(got, want), f"{ranks} ranks"
        assert res["metrics"] == results["metrics"], f"{ranks} ranks"  # train, val and test
        assert res["rows"] == results["rows"] and res["rows"]["train"] > 3_900
        streamed = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        assert [h["val"] for h in streamed] == [h["val"] for h in history]
        held = res["memory"]["data_mb"]  # two read buffers, far below the rows a rank holds
        assert len(held) == ranks and max(held) < 0.03


def test_streamed_run_resumes_bitwise(tmp_path, data):
    one, *_ = data
    optim = {"name": "lbfgs"}
    want, _, _ = _train(tmp_path, 2, str(one), "straight", optim)
    _train(tmp_path, 2, str(one), "cut", optim, "train.epochs=2")
    got, _, res = _train(tmp_path, 2, str(one), "cut", optim, "--resume", "auto")
    assert "resuming from" in res.stdout + res.stderr
    assert np.array_equal(got, want)


ADAM = {"name": "adam", "lr": 0.05}


def test_streamed_mini_batches_are_rank_count_invariant_and_resume_mid_epoch(tmp_path, data):
    """The streaming shuffle (windows of blocks, batches inside each): 1, 2 and 3 ranks (file,
    gzip copy, shards) give the same bits, every training row is in exactly one batch an epoch,
    and a 3-rank run that crashed mid-epoch resumes on 2 ranks to those bits."""
    one, gz, parts = data
    batch = ("train.batch_size=64", "checkpoint.every_steps=7")
    want, results, _ = _train(tmp_path, 1, str(one), "mb1", ADAM, *batch)
    seen = results["throughput"]["rows"]
    assert seen == results["epochs"] * results["rows"]["train"]  # each row once an epoch
    assert results["steps"] > results["epochs"] * results["rows"]["train"] // 64
    for ranks, train in ((2, str(gz)), (3, parts)):
        got, res, _ = _train(tmp_path, ranks, train, f"mb{ranks}", ADAM, *batch)
        assert np.array_equal(got, want), f"{ranks} ranks"
        assert res["metrics"] == results["metrics"]
    cfg = tmp_path / "mb3.toml"
    run = tmp_path / "mb3"
    crashed = lepton(
        3, "train", cfg, *batch, "--overwrite", env=mpi_env(LEPTON_FAULT="raise=1@40"), timeout=120
    )
    assert crashed.returncode != 0
    path, state = newest_valid(run / "checkpoints")
    assert state.batch > 0  # mid-epoch: inside a window
    res = ok(lepton(2, "train", cfg, *batch, "--resume", "auto", timeout=120))
    check_resumed(res.stdout, run, path, state)
    assert np.array_equal(read_params(run / "model.h5"), want)


MAP_ROWS, MAP_FEATURES = 300_000, 8  # 9.6 MB of rows: pieces of whole 2 MiB file spans


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(a file whose rows are used as stored, two shards of it), row 1000 holding a NaN."""
    root = tmp_path_factory.mktemp("mapped")
    rng = np.random.default_rng(5)
    X = rng.normal(size=(MAP_ROWS, MAP_FEATURES)).astype(np.float32)
    y = (X @ rng.normal(size=MAP_FEATURES) > 0).astype(np.float64)
    X[1000, 3] = np.nan
    with h5py.File(root / "one.h5", "w") as fh:
        fh["X"], fh["y"] = X, y
    parts = [root / "a.h5", root / "b.h5"]
    for path, rows in zip(parts, (slice(0, 123_457), slice(123_457, None)), strict=True):
        with h5py.File(path, "w") as fh:
            fh["X"], fh["y"] = X[rows], y[rows]
    return root / "one.h5", [str(p) for p in parts]


def _plain(tmp_path, ranks, train, name, *extra, stream=True, env=None, reproducible=True):
    test = str(Path(train[0] if isinstance(train, list) else train).with_name("one.h5"))
    cfg = write_config(
        tmp_path / f"{name}.toml",
        {
            "data": {
                "train": train,
                "test": test,
                "nonfinite": "drop",
                "stream": stream,
                "buffer_mb": 4,
            },
            "model": {"kind": "logistic", "l2": 1e-3},
            "optim": {"name": "lbfgs"},
            "train": {"epochs": 3},
            "comm": {"reproducible": reproducible},
            "output": {"dir": str(tmp_path / name), "plot": False},
        },
    )
    res = ok(lepton(ranks, "train", cfg, *extra, env=env, timeout=120))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return read_params(tmp_path / name / "model.h5"), results, res.stdout + res.stderr


def test_mapped_pieces_are_bitwise_in_memory_at_1_2_3_ranks(tmp_path, plain):
    """Rows used as stored (no scaler, no hold-out) are mapped from the file in every pass, not
    copied: the same bits as in memory (and as copied pieces), the piece holding the dropped
    NaN row read instead; shards map each file's pieces; the test file is streamed too."""
    one, parts = plain
    want, results, _ = _plain(tmp_path, 1, str(one), "memory", stream=False)
    assert results["rows"]["train"] == MAP_ROWS - 1
    assert results["metrics"]["test"]["rows"] == MAP_ROWS - 1
    for ranks, train in ((1, str(one)), (2, str(one)), (3, parts)):
        got, res, out = _plain(tmp_path, ranks, train, f"mapped{ranks}")
        assert "mapped from the file each pass" in out, out
        assert "1 holding NaN/Inf rows are read" in out  # row 1000 is rank 0's
        assert np.array_equal(got, want), f"{ranks} ranks"
        assert res["metrics"] == results["metrics"], f"{ranks} ranks"
        assert max(res["memory"]["data_mb"]) < 10  # three 2 MiB pieces and the targets
    got, _, out = _plain(tmp_path, 2, str(one), "copied", env=mpi_env(LEPTON_READ="pread"))
    assert "read into two buffers" in out
    assert np.array_equal(got, want)
    # the default mode adds the pieces' float64 sums in piece order: in-memory to rounding
    loose, _, _ = _plain(tmp_path, 1, str(one), "memory_fast", stream=False, reproducible=False)
    got, _, _ = _plain(tmp_path, 2, str(one), "mapped_fast", reproducible=False)
    np.testing.assert_allclose(got, loose, rtol=1e-9, atol=1e-12)


def test_stream_refuses_what_it_cannot_do(tmp_path, data):
    one, *_ = data
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "data": {"train": str(one), "stream": True},
            "model": {"kind": "logistic"},
            "output": {"dir": str(tmp_path / "out"), "plot": False},
        },
    )
    cases = {
        "comm.strategy=local_sgd": 'needs comm.strategy = "sync"',
        "data.buffer_mb=0": "data.buffer_mb",
        "data.nonfinite=error": "rows hold NaN or Inf (first: row 17)",
    }
    for override, message in cases.items():
        res = lepton(2, "train", cfg, override, timeout=60)
        out = res.stdout + res.stderr
        assert res.returncode != 0, override
        assert message in out, (override, out)
        assert "Traceback" not in out, override
        assert not (tmp_path / "out" / "model.h5").exists()

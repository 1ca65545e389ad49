"""Speed-proportional load balancing (``data.balance = "speed"``) under real ``mpiexec``: a rank
made slow with ``LEPTON_FAULT=slow=F@RANK`` gets fewer rows after the first epoch, and the
results are those of the even split (bitwise with ``comm.reproducible``, to rounding without)."""

import json
import re

import h5py
import numpy as np
import pytest

from tests.conftest import datagen, lepton, mpi_env, ok, read_params, write_config
from tests.resume_checks import check_resumed, newest_valid

SLOW = mpi_env(LEPTON_FAULT="slow=3@1")
MOVED = re.compile(r"data\.balance: re-partitioned .*?rows per rank \[([\d, ]+)\] -> \[([\d, ]+)\]")

MLP = {
    "model": {"kind": "mlp", "hidden": [32], "activation": "tanh"},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 5, "batch_size": 0, "seed": 1},
}
LBFGS = {
    "model": {"kind": "logistic"},
    "optim": {"name": "lbfgs"},
    "train": {"epochs": 5, "batch_size": 0, "seed": 1},
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """20,001 rows (64 global blocks of 313 rows, the last of 282): enough compute per rank
    that a rank 3 times slower is seen through the timer noise."""
    return datagen(tmp_path_factory.mktemp("balance") / "d.h5", 20001, 8, seed=3)


@pytest.fixture(scope="module")
def nan_file(tmp_path_factory, data_file):
    """The same rows with NaN in rows that change owner (just past rank 0's even block, which
    ends at row 10,016 on 2 ranks) and one that does not (row 100)."""
    path = tmp_path_factory.mktemp("balance_nan") / "nan.h5"
    with h5py.File(data_file, "r") as fh:
        X, y = fh["X"][()], fh["y"][()]
    X[[100, 10020, 10700], 2] = np.nan
    with h5py.File(path, "w") as fh:
        fh["X"], fh["y"] = X, y
    return path


def train(tmp_path, ranks, data, name, body, *, balance, reproducible, env=None, extra=None):
    """One training job; returns (final parameters, results.json, its output: stdout, stderr)."""
    sections = {
        "data": {"train": str(data), "scale": "zscore", "balance": balance, **(extra or {})},
        **body,
        "comm": {"reproducible": reproducible},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    cfg = write_config(tmp_path / f"{name}.toml", sections)
    res = ok(lepton(ranks, "train", cfg, timeout=120, env=env))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return read_params(tmp_path / name / "model.h5"), results, res.stdout + res.stderr


def moves(stdout: str) -> list[tuple[list[int], list[int]]]:
    """(old, new) training rows per rank of each re-partition the log reports."""
    return [
        ([int(v) for v in a.split(",")], [int(v) for v in b.split(",")])
        for a, b in MOVED.findall(stdout)
    ]


def check_moved_off(stdout: str, results: dict, slow_rank: int, ranks: int) -> None:
    """The log says the rows moved, and the slow rank ends with fewer rows than rank 0."""
    said = moves(stdout)
    assert said, stdout
    old, new = said[0]
    assert len(old) == len(new) == ranks and sum(old) == sum(new), said
    assert new[slow_rank] < old[slow_rank] and new[slow_rank] < new[0], said
    rows = [t["rows"] for t in results["ranks_timing"]]
    assert rows[slow_rank] < rows[0], rows
    assert sum(rows) == results["rows"]["train"], rows


@pytest.mark.parametrize("body", [MLP, LBFGS], ids=["adam", "lbfgs"])
def test_reproducible_balanced_run_is_bitwise_the_even_split(data_file, tmp_path, body):
    balanced, results, out = train(
        tmp_path, 2, data_file, "bal", body, balance="speed", reproducible=True, env=SLOW
    )
    check_moved_off(out, results, 1, 2)
    even, _, even_out = train(
        tmp_path, 2, data_file, "even", body, balance="none", reproducible=True, env=SLOW
    )
    assert not moves(even_out)
    one, _, _ = train(tmp_path, 1, data_file, "one", body, balance="speed", reproducible=True)
    assert balanced.tobytes() == even.tobytes() == one.tobytes()


MINI = {**MLP, "train": {"epochs": 4, "batch_size": 500, "seed": 1}}


def test_mini_batches_are_those_of_the_even_split(data_file, tmp_path):
    """A mini-batch is a set of global training rows (``EpochBatches``: a seeded permutation of
    the global row numbers, each rank taking the rows of each batch it holds), so moving rows
    between ranks in file order changes who computes a row, never which batch it is in:
    bitwise in reproducible mode (and the 1-rank run's bits), to rounding in the default mode."""
    for reproducible in (True, False):
        name = f"bal_{reproducible}"
        balanced, results, out = train(
            tmp_path, 2, data_file, name, MINI, balance="speed", reproducible=reproducible, env=SLOW
        )
        check_moved_off(out, results, 1, 2)
        ranks = 1 if reproducible else 2  # reproducible: the 1-rank run's bits
        even, _, _ = train(
            tmp_path,
            ranks,
            data_file,
            f"even_{reproducible}",
            MINI,
            balance="none",
            reproducible=reproducible,
        )
        if reproducible:
            assert balanced.tobytes() == even.tobytes()
        else:
            np.testing.assert_allclose(balanced, even, rtol=1e-12, atol=1e-14)


def test_default_mode_balanced_run_agrees_to_rounding(data_file, tmp_path):
    balanced, results, out = train(
        tmp_path, 2, data_file, "bal", MLP, balance="speed", reproducible=False, env=SLOW
    )
    check_moved_off(out, results, 1, 2)
    even, _, _ = train(tmp_path, 2, data_file, "even", MLP, balance="none", reproducible=False)
    np.testing.assert_allclose(balanced, even, rtol=1e-12, atol=1e-14)


def test_validation_and_dropped_rows_in_moved_rows(nan_file, tmp_path):
    """Held-out rows never train and stay with their owner; NaN rows gained are dropped as at
    the start: bitwise parameters and equal validation metrics."""
    extra = {"validation_fraction": 0.2, "nonfinite": "drop"}
    runs = {}
    for name, balance, env in (("bal", "speed", SLOW), ("even", "none", None)):
        runs[name] = train(
            tmp_path,
            2,
            nan_file,
            name,
            MLP,
            balance=balance,
            reproducible=True,
            env=env,
            extra=extra,
        )
    (p_bal, r_bal, out), (p_even, r_even, _) = runs["bal"], runs["even"]
    check_moved_off(out, r_bal, 1, 2)
    assert "dropped 3 of 20001 rows" in out
    assert p_bal.tobytes() == p_even.tobytes()
    assert r_bal["rows"] == r_even["rows"]
    history = {}
    for name in runs:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        history[name] = [json.loads(line)["val"] for line in lines]
    assert len(history["bal"]) == MLP["train"]["epochs"]
    assert history["bal"] == history["even"]
    assert r_bal["metrics"]["val"] == r_even["metrics"]["val"]


def test_sharded_data_is_read_across_files(data_file, tmp_path):
    """Rows gained are read from the shards holding them (a move crosses a file boundary): the
    bits of the even split of one file holding the same rows."""
    with h5py.File(data_file, "r") as fh:
        X, y = fh["X"][()], fh["y"][()]
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, (a, b) in enumerate([(0, 9000), (9000, 12000), (12000, 20001)]):
        with h5py.File(parts / f"part-{i}.h5", "w") as fh:
            fh["X"], fh["y"] = X[a:b], y[a:b]
    extra = {"validation_fraction": 0.2}
    sharded, results, out = train(
        tmp_path,
        2,
        str(parts / "part-*.h5"),
        "bal",
        MLP,
        balance="speed",
        reproducible=True,
        env=SLOW,
        extra=extra,
    )
    check_moved_off(out, results, 1, 2)
    one, _, _ = train(
        tmp_path, 2, data_file, "even", MLP, balance="none", reproducible=True, extra=extra
    )
    assert sharded.tobytes() == one.tobytes()


def test_three_ranks_one_slow_is_bitwise(data_file, tmp_path):
    balanced, results, out = train(
        tmp_path, 3, data_file, "bal", MLP, balance="speed", reproducible=True, env=SLOW
    )
    check_moved_off(out, results, 1, 3)
    one, _, _ = train(tmp_path, 1, data_file, "one", MLP, balance="none", reproducible=True)
    assert balanced.tobytes() == one.tobytes()


def test_resume_balances_again_and_is_bitwise(data_file, tmp_path):
    """A run crashed after epoch 2 resumes from the even split, balances again after its first
    epoch, and ends with the uninterrupted balanced run's bits."""
    reference, _, _ = train(
        tmp_path, 2, data_file, "ref", MLP, balance="speed", reproducible=True, env=SLOW
    )
    run = tmp_path / "crash"
    cfg = write_config(
        tmp_path / "crash.toml",
        {
            "data": {"train": str(data_file), "scale": "zscore", "balance": "speed"},
            **MLP,
            "comm": {"reproducible": True},
            "output": {"dir": str(run), "plot": False},
        },
    )
    crash = mpi_env(LEPTON_FAULT="slow=3@1,raise=1@2")
    crashed = lepton(2, "train", cfg, env=crash, timeout=120)
    assert crashed.returncode != 0
    assert moves(crashed.stdout), crashed.stdout  # balanced before the crash
    path, state = newest_valid(run / "checkpoints")
    assert state.epoch == 2
    res = ok(lepton(2, "train", cfg, "--resume", "auto", env=SLOW, timeout=120))
    check_resumed(res.stdout, run, path, state)
    said = moves(res.stdout)
    assert said and said[0][0] == [10016, 9985], said  # from the even split again
    assert read_params(run / "model.h5").tobytes() == reference.tobytes()


@pytest.mark.parametrize(
    ("sections", "detail"),
    [
        ({"data": {"stream": True}}, "data.stream is not supported"),
        ({"comm": {"strategy": "local_sgd"}}, 'needs comm.strategy = "sync"'),
        (
            {
                "model": {"kind": "mlp", "hidden": [4], "parallel": "tensor"},
                "comm": {"tensor_ranks": 2},
            },
            'model.parallel = "tensor"',
        ),
    ],
    ids=["stream", "local_sgd", "tensor"],
)
def test_unsupported_combinations_are_one_config_error(data_file, tmp_path, sections, detail):
    base = {
        "data": {"train": str(data_file), "balance": "speed"},
        "model": {"kind": "logistic"},
        "train": {"epochs": 1, "batch_size": 0},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    cfg = write_config(tmp_path / "bad.toml", base)
    res = lepton(2, "train", cfg, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("lepton")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "config key 'data.balance'" in lines[0] and detail in lines[0], lines
    assert not (tmp_path / "run").exists()

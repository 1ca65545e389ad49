"""The Python interface under real ``mpiexec``: SPMD estimator fits and ``train`` from a script.

- every estimator, each rank passing an uneven block (rank 1 of 3 passes none), on 1, 2 and 3
  ranks: the parameters, loss curve and predictions equal the 1-rank fit to 1e-6 relative, and
  bit for bit with ``reproducible=True``;
- ``train`` from a script writes the same ``model.h5`` parameters, bit for bit, as ``lepton
  train`` on the same config, on 1 and 2 ranks, and raises a bad override on every rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SCRIPTS, datagen, lepton, ok, read_params, run_mpi, write_config

TIMEOUT = 120


@pytest.fixture(scope="module")
def spmd_fits(tmp_path_factory) -> dict[int, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("spmd")
    fits = {}
    for n in (1, 2, 3):
        res = ok(
            run_mpi(n, [str(SCRIPTS / "api_spmd.py"), str(out / f"fit{n}.npz")], timeout=TIMEOUT)
        )
        assert f"api_spmd: ok {n}" in res.stdout
        assert res.stdout.count("caught ValueError: Input X contains NaN") == n
        with np.load(out / f"fit{n}.npz") as f:
            fits[n] = {k: f[k] for k in f.files}
    return fits


@pytest.mark.parametrize("ranks", [2, 3])
def test_estimators_equal_one_process_fit(spmd_fits, ranks: int) -> None:
    one, many = spmd_fits[1], spmd_fits[ranks]
    assert one.keys() == many.keys()
    for key, ref in one.items():
        got = many[key]
        assert got.shape == ref.shape, key
        if "_repro" in key:
            assert np.array_equal(got, ref), f"{key}: not bitwise equal on {ranks} ranks"
        else:
            scale = max(float(np.max(np.abs(ref))), 1e-12)
            assert float(np.max(np.abs(got - ref))) <= 1e-6 * scale, key


def test_bitwise_comparison_discriminates(spmd_fits) -> None:
    """Without reproducible mode the split changes the summation order, so some fit differs in
    its last bits: the bitwise checks above compare something that can differ."""
    plain = [k for k in spmd_fits[1] if "_plain" in k]
    differs = [
        k for n in (2, 3) for k in plain if not np.array_equal(spmd_fits[1][k], spmd_fits[n][k])
    ]
    assert differs


def test_spmd_fits_learn(spmd_fits) -> None:
    """The compared fits are real fits: the loss falls on every case."""
    for key, curve in spmd_fits[1].items():
        if key.endswith("_loss"):
            assert curve[-1] < curve[0], key


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    data = datagen(tmp / "blobs.h5", rows=600, features=5, seed=2, task="blobs")
    return write_config(
        tmp / "job.toml",
        {
            "data": {"train": str(data), "validation_fraction": 0.1, "scale": "zscore"},
            "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 3, "batch_size": 64, "seed": 5},
            "output": {"dir": str(tmp / "unused"), "plot": False},
        },
    )


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_equals_cli(train_config: Path, ranks: int) -> None:
    tmp = train_config.parent
    cli_dir, api_dir = tmp / f"cli{ranks}", tmp / f"api{ranks}"
    ok(lepton(ranks, "train", train_config, f"output.dir={cli_dir}", timeout=TIMEOUT))
    res = ok(
        run_mpi(
            ranks,
            [str(SCRIPTS / "api_train.py"), str(train_config), str(api_dir)],
            timeout=TIMEOUT,
        )
    )
    assert "api_train: ok" in res.stdout
    assert res.stdout.count("caught ConfigError") == ranks
    cli, api = read_params(cli_dir / "model.h5"), read_params(api_dir / "model.h5")
    assert np.array_equal(cli, api)
    assert (cli_dir / "metrics.jsonl").read_text().count("\n") == 3

"""``lepton train`` with ``train.device = "cuda"`` end to end (on the real GPU when one is visible,
else Numba's simulator): mini-batches are gathered on the device and the result equals the CPU
run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import lepton, mpi_env, ok, read_params, write_config, write_h5


@pytest.mark.parametrize("ranks", [1, 2])
def test_cuda_minibatch_training_equals_cpu(kc, gpu_env, tmp_path, ranks):
    assert kc.is_available()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = (X @ rng.normal(size=5) + 0.3 * rng.normal(size=300) > 0).astype(np.float64)
    data = write_h5(tmp_path / "d.h5", X, y)
    params = {}
    for device in ("cpu", "cuda"):
        cfg = write_config(
            tmp_path / f"{device}.toml",
            {
                "data": {"train": str(data)},
                "model": {"kind": "logistic"},
                "optim": {"name": "adam", "lr": 0.05},
                "train": {"epochs": 2, "batch_size": 64, "device": device, "seed": 3},
                "output": {"dir": str(tmp_path / device), "plot": False},
            },
        )
        env = mpi_env(**gpu_env)
        ok(lepton(ranks, "train", cfg, env=env, timeout=600))
        params[device] = read_params(tmp_path / device / "model.h5")
        results = json.loads((tmp_path / device / "results.json").read_text())
        assert results["device"] == device
    np.testing.assert_allclose(params["cuda"], params["cpu"], rtol=1e-9, atol=1e-12)


def test_cuda_tensor_parallel_training_equals_cpu(kc, gpu_env, tmp_path):
    """``model.parallel = "tensor"`` on 2 ranks (one tensor group of 2) with the slices'
    kernels on the GPU: the parameters of the same run on the CPU (1e-10 relative)."""
    assert kc.is_available()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(64, 3)).astype(np.float32)
    y = (X @ rng.normal(size=3) + 0.3 * rng.normal(size=64) > 0).astype(np.float64)
    data = write_h5(tmp_path / "d.h5", X, y)
    params = {}
    for device in ("cpu", "cuda"):
        cfg = write_config(
            tmp_path / f"tp-{device}.toml",
            {
                "data": {"train": str(data), "validation_fraction": 0.25},
                "model": {
                    "kind": "mlp",
                    "hidden": [4, 4],
                    "activation": "tanh",
                    "parallel": "tensor",
                },
                "comm": {"tensor_ranks": 2},
                "optim": {"name": "adam", "lr": 0.05},
                "train": {"epochs": 2, "batch_size": 16, "device": device, "seed": 3},
                "output": {"dir": str(tmp_path / device), "plot": False},
            },
        )
        ok(lepton(2, "train", cfg, env=mpi_env(**gpu_env), timeout=600))
        params[device] = read_params(tmp_path / device / "model.h5")
        results = json.loads((tmp_path / device / "results.json").read_text())
        assert results["device"] == device
    scale = np.max(np.abs(params["cpu"]))
    assert np.max(np.abs(params["cuda"] - params["cpu"])) <= 1e-10 * scale

"""``lepton train`` with ``train.device = "cuda"`` end to end (on the real GPU when one is visible,
else Numba's simulator): mini-batches are gathered on the device and the result equals the CPU
run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import lepton, mpi_env, ok, read_params, write_config, write_h5


def cpu_and_cuda(tmp_path, gpu_env, ranks: int, rows: int, features: int, sections: dict):
    """The same run on the CPU and on CUDA (a linearly separable-ish binary task of ``rows`` x
    ``features``): each device's final parameters, after checking results.json names it."""
    rng = np.random.default_rng(features)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = (X @ rng.normal(size=features) + 0.3 * rng.normal(size=rows) > 0).astype(np.float64)
    data = write_h5(tmp_path / "d.h5", X, y)
    params = {}
    for device in ("cpu", "cuda"):
        body = {key: dict(value) for key, value in sections.items()}
        body.setdefault("data", {})["train"] = str(data)
        body.setdefault("train", {})["device"] = device
        body["output"] = {"dir": str(tmp_path / device), "plot": False}
        cfg = write_config(tmp_path / f"{device}.toml", body)
        ok(lepton(ranks, "train", cfg, env=mpi_env(**gpu_env), timeout=600))
        params[device] = read_params(tmp_path / device / "model.h5")
        results = json.loads((tmp_path / device / "results.json").read_text())
        assert results["device"] == device
    return params


@pytest.mark.parametrize("ranks", [1, 2])
def test_cuda_minibatch_training_equals_cpu(kc, gpu_env, tmp_path, ranks):
    assert kc.is_available()
    sections = {
        "model": {"kind": "logistic"},
        "optim": {"name": "adam", "lr": 0.05},
        "train": {"epochs": 2, "batch_size": 64, "seed": 3},
    }
    params = cpu_and_cuda(tmp_path, gpu_env, ranks, 300, 5, sections)
    np.testing.assert_allclose(params["cuda"], params["cpu"], rtol=1e-9, atol=1e-12)


def test_cuda_tensor_parallel_training_equals_cpu(kc, gpu_env, tmp_path):
    """``model.parallel = "tensor"`` on 2 ranks (one tensor group of 2) with the slices'
    kernels on the GPU: the parameters of the same run on the CPU (1e-10 relative)."""
    assert kc.is_available()
    sections = {
        "data": {"validation_fraction": 0.25},
        "model": {"kind": "mlp", "hidden": [4, 4], "activation": "tanh", "parallel": "tensor"},
        "comm": {"tensor_ranks": 2},
        "optim": {"name": "adam", "lr": 0.05},
        "train": {"epochs": 2, "batch_size": 16, "seed": 3},
    }
    params = cpu_and_cuda(tmp_path, gpu_env, 2, 64, 3, sections)
    scale = np.max(np.abs(params["cpu"]))
    assert np.max(np.abs(params["cuda"] - params["cpu"])) <= 1e-10 * scale

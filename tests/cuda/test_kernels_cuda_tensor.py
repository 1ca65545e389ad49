"""The tensor-parallel slices on the GPU (``kernels.cuda_tensor``) against the CPU slices
(``kernels.tensor``, 1e-12 relative) and the float64 reference (``kernels.reference``, 1e-10):
k = 1, 2, 4 simulated ranks (threads whose ``allreduce`` sums in rank order), float32 and
float64 rows, host and device rows, uneven row counts (0 rows too), each rank's device buffers
reused from call to call. Sizes are small: under ``NUMBA_ENABLE_CUDASIM=1`` every CUDA thread is
a Python thread."""

from __future__ import annotations

import numpy as np
import pytest
from lepton_hpc.kernels import BINARY, RELU, SIGMOID, SOFTMAX, SQUARED, TANH, reference, tensor

from lepton_hpc.config import load_config
from lepton_hpc.device import CudaDevice, Device
from lepton_hpc.errors import ConfigError
from tests.unit.test_kernels_tensor import problem, run_group

ROWS = (7, 33, 1, 0)  # in this order on every rank: the buffers grow, then are reused smaller
N = max(ROWS)

CASES = [  # (sizes, head, activation, k): one and two pairs, odd and even layer counts
    ((5, 8, 1), BINARY, TANH, 2),
    ((5, 8, 6, 1), BINARY, RELU, 4),
    ((4, 8, 6, 12, 3), SOFTMAX, SIGMOID, 2),
    ((4, 12, 3, 8, 2), SQUARED, TANH, 4),
    ((3, 4, 2), SQUARED, RELU, 1),
    ((4, 6, 4, 3), SOFTMAX, TANH, 1),
]


def assemble(plans, parts, n_full: int) -> np.ndarray:
    """The full gradient from the ranks' slices (replicated entries must agree bitwise)."""
    got = np.full(n_full, np.nan)
    for p, part in zip(plans, parts, strict=True):
        seen = got[p.own]
        assert (np.isnan(seen) | (seen == part[: p.n_local])).all()
        got[p.own] = part[: p.n_local]
    assert not np.isnan(got).any()  # the slices cover every parameter
    return got


def close(got, want, rtol) -> None:
    """|got - want| <= rtol x the largest |want| (per-entry cancellation makes entry-wise
    relative errors meaningless for gradients)."""
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
    assert float(np.max(np.abs(got - want), initial=0.0)) <= rtol * scale


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("sizes", "head", "act", "k"), CASES)
def test_cuda_slices_equal_cpu_slices_and_reference(kc, sizes, head, act, k, dtype, on_device):
    from lepton_hpc.kernels import cuda_tensor

    X, y, params = problem(sizes, head, N, dtype, seed=k)
    plans = [tensor.make_plan(sizes, k, t) for t in range(k)]
    flags = [float(t + 1) for t in range(k)]  # agreed: their sum on every rank
    got = {m: [None] * k for m in ROWS}  # per rows: each rank's (gpu, cpu, flags, outputs)

    def body(t, allreduce):
        p, local = plans[t], np.ascontiguousarray(params[plans[t].own])
        for m in ROWS:
            Xm, ym = X[:m], y[:m]
            if on_device:
                Xm, ym = kc.to_device(Xm), kc.to_device(ym)
            gpu, cpu = np.empty(p.n_local + 2), np.empty(p.n_local + 2)
            f_gpu = cuda_tensor.sliced_gradient(
                Xm, ym, local, p, act, head, gpu, allreduce, flags[t]
            )
            f_cpu = tensor.sliced_gradient(
                X[:m], y[:m], local, p, act, head, cpu, allreduce, flags[t]
            )
            k_out = sizes[-1]
            o_gpu, o_cpu = np.empty((m, k_out)), np.empty((m, k_out))
            cuda_tensor.sliced_forward(Xm, local, p, act, head, o_gpu, allreduce)
            tensor.sliced_forward(X[:m], local, p, act, head, o_cpu, allreduce)
            got[m][t] = (gpu, cpu, (f_gpu, f_cpu), (o_gpu, o_cpu))

    run_group(k, body)
    for m in ROWS:
        want = np.empty(params.size + 2)
        reference.gradient(X[:m], y[:m], params, np.array(sizes), act, head, want)
        ref_out = np.empty((m, sizes[-1]))
        reference.forward(X[:m], params, np.array(sizes), act, head, ref_out)
        for t, (gpu, cpu, agreed, outs) in enumerate(got[m]):
            n = plans[t].n_local
            assert agreed == (sum(flags), sum(flags))
            close(gpu[:n], cpu[:n], 1e-12)
            assert gpu[n] == pytest.approx(cpu[n], rel=1e-12, abs=1e-300)
            assert gpu[n] == pytest.approx(want[-2], rel=1e-10, abs=1e-300)
            assert gpu[n + 1] == cpu[n + 1] == m
            if m == 0:
                assert not gpu.any()
            close(outs[0], outs[1], 1e-12)
            close(outs[0], ref_out, 1e-10)
        close(assemble(plans, [g[0] for g in got[m]], params.size), want[:-2], 1e-10)


def test_devices_run_the_slices(kc):
    """The ``Backend`` methods: ``Device`` runs ``kernels.tensor``, ``CudaDevice``
    ``kernels.cuda_tensor`` (on rows the device placed), with the same results."""
    from lepton_hpc.kernels import cpu

    sizes, head, act = (4, 6, 4, 3), SOFTMAX, TANH
    X, y, params = problem(sizes, head, 9, np.float32)
    p = tensor.make_plan(sizes, 1, 0)
    results = []
    for device in (Device("cpu", cpu), CudaDevice("cuda", kc)):
        assert device.tensor_kernels().__name__.endswith("tensor")
        out, outs = np.empty(p.n_local + 2), np.empty((9, 3))
        flag = device.sliced_gradient(
            device.place(X), device.place(y), params, p, act, head, out, lambda b: b, 1.0
        )
        device.sliced_forward(device.place(X), params, p, act, head, outs, lambda b: b)
        results.append((flag, out, outs))
    (f0, g0, o0), (f1, g1, o1) = results
    assert f0 == f1 == 1.0
    close(g1, g0, 1e-12)
    close(o1, o0, 1e-12)


def test_bad_arguments_are_refused(kc):
    from lepton_hpc.kernels import cuda_tensor

    sizes = (3, 4, 2)
    X, y, params = problem(sizes, SQUARED, 5)
    p = tensor.make_plan(sizes, 1, 0)
    out = np.empty(p.n_local + 2)
    with pytest.raises(ValueError, match="X must be"):
        cuda_tensor.sliced_gradient(X[:, :2], y, params, p, RELU, SQUARED, out, lambda b: b)
    with pytest.raises(ValueError, match="out must be"):
        cuda_tensor.sliced_gradient(X, y, params, p, RELU, SQUARED, out[:-1], lambda b: b)
    with pytest.raises(ValueError, match="parameters"):
        cuda_tensor.sliced_gradient(X, y, params[:-1], p, RELU, SQUARED, out, lambda b: b)
    with pytest.raises(ValueError, match="y must have"):
        cuda_tensor.sliced_gradient(X, y[:-1], params, p, RELU, SQUARED, out, lambda b: b)


@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
def test_tensor_parallelism_takes_any_device(tmp_path, device):
    """The config no longer refuses a GPU with model.parallel = "tensor"; the other refusals
    stay."""
    path = tmp_path / "c.toml"
    path.write_text('[model]\nkind = "mlp"\nhidden = [4, 4]\n')
    base = ["model.parallel=tensor", "comm.tensor_ranks=2", f"train.device={device}"]
    cfg = load_config(path, base)
    assert cfg.train.device == device and cfg.model.parallel == "tensor"
    with pytest.raises(ConfigError, match="lbfgs"):
        load_config(path, [*base, "optim.name=lbfgs"])

"""Tensor-parallel MLP slices on the GPU: ``tensor.sliced_gradient`` / ``sliced_forward`` with
``numba.cuda`` kernels (the plan, the pieces and the contract are ``tensor``'s).

The same passes as the CPU slices, one kernel per stage, every thread owning its outputs:

* ``dense``: one thread per (row, unit): the bias (when the layer adds it here), then the inputs
  in order, float64 (float32 X is widened as it is read); the activation fused when no sum over
  the tensor group comes between.
* ``bias_activate``: a row-parallel layer's bias and activation, after its partial products were
  summed over the group.
* ``head_loss``: one thread per row: the head's loss and d loss / d logits (``cuda_device``'s
  ``head_delta``); ``sum_losses`` then adds the rows' losses in row order in ONE thread.
* ``accumulate``: one thread per parameter entry of the layer: sum over the rows, in order, of
  input x delta (or of delta, for a bias): no atomics, a fixed order.
* ``backprop``: one thread per (row, input): delta @ W^T, times the activation's slope when no
  sum over the group comes between (``apply_slope`` otherwise, after it).
* ``outputs``: the model's outputs of each row (``cuda_device``'s ``head_output``).

Activations, slopes and heads are ``cuda_device``'s device functions (the ones the data-parallel
CUDA kernels use). The parameters are uploaded once per call; the rows stay where they are when
they are device arrays (``cuda.to_device``: the engine places a rank's rows on the GPU once) and
are uploaded when they are host arrays. The partial sums the CPU code hands to ``allreduce`` are
downloaded to a host buffer, summed by ``allreduce`` and uploaded back: one download and one
upload per pair and direction. The gradient and the loss come back in one download.

Device buffers (activations, deltas, the gradient) are kept per thread and reused from call to
call while their shapes allow (rows: grown when needed). Every device operation runs under one
process-wide lock, released around ``allreduce``: the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)
runs one kernel at a time and swaps this module's ``cuda`` while it runs, and the tests run a
tensor group's ranks as threads of one process (an MPI job has one rank per process, where the
lock is never contended).
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from . import cuda as kc
from .checks import targets
from .cuda_device import _kernels as _device_kernels
from .tensor import COLUMN, ROW, TensorPlan, agree_flag

try:  # numba.cuda imports without a GPU; only a numba built without CUDA support lacks it.
    from numba import cuda
except ImportError:  # pragma: no cover - depends on the numba build
    cuda = None

NO_ACTIVATION = -1  # ``activation`` argument of the kernels: the layer's outputs stay linear

_LOCK = threading.RLock()  # every device operation (see the module's docstring)
_local = threading.local()  # this thread's device buffers


# ---- device kernels (built on first use) -------------------------------------------------------
@functools.cache
def _kernels():
    """Compile-on-demand dispatchers, built once numba.cuda is known to be usable."""
    from types import SimpleNamespace

    dev = _device_kernels()
    activate, slope = dev.activate, dev.slope
    head_delta, head_output = dev.head_delta, dev.head_output

    @cuda.jit
    def dense(src, params, w0, b0, nb, n_out, activation, dst):
        """dst[i, o] = (b[o] when nb > 0) + sum_j src[i, j] W[j, o] (j in order), activated
        unless ``activation`` is NO_ACTIVATION; W (n_in x n_out) at w0, b at b0 of params."""
        m, n_in = src.shape[0], src.shape[1]
        t, step = cuda.grid(1), cuda.gridsize(1)
        while t < m * n_out:
            i = t // n_out
            o = t - i * n_out
            a = params[b0 + o] if nb > 0 else 0.0
            for j in range(n_in):
                a += src[i, j] * params[w0 + j * n_out + o]
            if activation != NO_ACTIVATION:
                a = activate(a, activation)
            dst[i, o] = a
            t += step

    @cuda.jit
    def bias_activate(z, params, b0, activation):
        """z[i, o] += b[o], then the activation (unless NO_ACTIVATION)."""
        m, n_out = z.shape[0], z.shape[1]
        t, step = cuda.grid(1), cuda.gridsize(1)
        while t < m * n_out:
            i = t // n_out
            o = t - i * n_out
            a = z[i, o] + params[b0 + o]
            if activation != NO_ACTIVATION:
                a = activate(a, activation)
            z[i, o] = a
            t += step

    @cuda.jit
    def head_loss(z, y2, head, delta, losses):
        """Row i: losses[i] = its loss from the logits z[i]; delta[i] = d loss / d logits."""
        m, k = z.shape[0], z.shape[1]
        i, step = cuda.grid(1), cuda.gridsize(1)
        while i < m:
            for j in range(k):
                delta[i, j] = z[i, j]
            losses[i] = head_delta(delta[i], 0, k, y2, i, head)
            i += step

    @cuda.jit
    def sum_losses(losses, m, result, at):
        """result[at] = losses[0] + losses[1] + ... (one thread: row order, as the CPU)."""
        if cuda.grid(1) == 0:
            s = 0.0
            for i in range(m):
                s += losses[i]
            result[at] = s

    @cuda.jit
    def accumulate(src, delta, grad, w0, b0):
        """grad[w0 + j * n_out + o] = sum_i src[i, j] delta[i, o] and grad[b0 + o] = sum_i
        delta[i, o]: one thread per entry, the rows in order."""
        m, n_in, n_out = src.shape[0], src.shape[1], delta.shape[1]
        nw = n_in * n_out
        t, step = cuda.grid(1), cuda.gridsize(1)
        while t < nw + n_out:
            s = 0.0
            if t < nw:
                j = t // n_out
                o = t - j * n_out
                for i in range(m):
                    s += src[i, j] * delta[i, o]
                grad[w0 + t] = s
            else:
                o = t - nw
                for i in range(m):
                    s += delta[i, o]
                grad[b0 + o] = s
            t += step

    @cuda.jit
    def backprop(delta, params, w0, act, activation, below):
        """below[i, j] = sum_o delta[i, o] W[j, o] (o in order), times the slope at act[i, j]
        unless ``activation`` is NO_ACTIVATION."""
        m, n_out, n_in = delta.shape[0], delta.shape[1], below.shape[1]
        t, step = cuda.grid(1), cuda.gridsize(1)
        while t < m * n_in:
            i = t // n_in
            j = t - i * n_in
            s = 0.0
            for o in range(n_out):
                s += delta[i, o] * params[w0 + j * n_out + o]
            if activation != NO_ACTIVATION:
                s *= slope(act[i, j], activation)
            below[i, j] = s
            t += step

    @cuda.jit
    def apply_slope(below, act, activation):
        """below[i, j] *= the activation's slope, written with its output act[i, j]."""
        m, n = below.shape[0], below.shape[1]
        t, step = cuda.grid(1), cuda.gridsize(1)
        while t < m * n:
            i = t // n
            j = t - i * n
            below[i, j] *= slope(act[i, j], activation)
            t += step

    @cuda.jit
    def outputs(z, head, out):
        """out[i] = the model's outputs from the logits z[i]."""
        i, step = cuda.grid(1), cuda.gridsize(1)
        while i < z.shape[0]:
            head_output(z[i], 0, z.shape[1], head, out[i])
            i += step

    return SimpleNamespace(
        dense=dense,
        bias_activate=bias_activate,
        head_loss=head_loss,
        sum_losses=sum_losses,
        accumulate=accumulate,
        backprop=backprop,
        apply_slope=apply_slope,
        outputs=outputs,
    )


# ---- host side ---------------------------------------------------------------------------------
def _buffers() -> dict:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers


def _vector(name: str, n: int):
    """A float64 device vector of length n, reused while n stays the same."""
    buffers = _buffers()
    buf = buffers.get(name)
    if buf is None or buf.shape != (n,):
        buf = buffers[name] = cuda.device_array((n,), dtype=np.float64)
    return buf


def _rows(name: str, m: int, cols: int):
    """The first m rows of a reused (capacity, cols) float64 device buffer (grown when needed)."""
    buffers = _buffers()
    buf = buffers.get(name)
    if buf is None or buf.shape[0] < m or buf.shape[1] != cols:
        buf = buffers[name] = cuda.device_array((max(m, 1), cols), dtype=np.float64)
    return buf[:m]


def _launch(kernel, count: int, *args) -> None:
    """``kernel`` over ``count`` work items (grid-stride loops; nothing to do for count 0)."""
    if count > 0:
        blocks, tpb = kc._launch(count, None, None)
        kernel[blocks, tpb](*args)


def _prepare(X, local, plan: TensorPlan):
    """X checked (a device array as it is, a host one uploaded) and the parameters uploaded;
    call with the lock held."""
    kc._require()
    X = kc._check_rows(X, plan.sizes[0])
    local = np.ascontiguousarray(local, dtype=np.float64)
    if local.shape != (plan.n_local,):
        raise ValueError(f"the slice must have {plan.n_local} parameters, got {local.shape}")
    d_params = _vector("params", plan.n_local)
    d_params.copy_to_device(local)
    return (kc._upload(X) if X.shape[0] else X), d_params


def _forward(X, m: int, d_params, plan: TensorPlan, activation: int, allreduce, flag: float):
    """Each layer's input and the logits (device arrays, the last entry) of the m rows of X;
    ``flag`` rides in the first forward sum and comes back summed over the group."""
    with _LOCK:  # (built on the first call: it uses this module's ``cuda``)
        ks = _kernels()
    last = len(plan.layers) - 1
    acts, a, carried = [X], X, False
    for index, L in enumerate(plan.layers):
        act = activation if index < last else NO_ACTIVATION
        with _LOCK:
            z = _rows(f"z{index}", m, L.n_out)
        if L.kind == ROW:  # partial products, summed over the group, then the bias once
            buf = np.empty(m * L.n_out + (0 if carried else 1))
            part = buf[: m * L.n_out].reshape(m, L.n_out)
            with _LOCK:
                args = (a, d_params, L.w0, L.b0, 0, L.n_out, NO_ACTIVATION, z)
                _launch(ks.dense, m * L.n_out, *args)
                if m:
                    z.copy_to_host(part)
            if not carried:
                buf[-1] = flag
            allreduce(buf)
            if not carried:
                flag, carried = float(buf[-1]), True
            with _LOCK:
                if m:
                    z.copy_to_device(part)
                _launch(ks.bias_activate, m * L.n_out, z, d_params, L.b0, act)
        else:
            with _LOCK:
                _launch(ks.dense, m * L.n_out, a, d_params, L.w0, L.b0, L.nb, L.n_out, act, z)
        acts.append(z)
        a = z
    return acts, flag if carried else agree_flag(flag, allreduce)


def _host_out(out: np.ndarray, shape: tuple[int, ...]) -> None:
    if out.dtype != np.float64 or not out.flags.c_contiguous or out.shape != shape:
        raise ValueError(f"out must be contiguous float64 of shape {shape}, got {out.shape}")


def sliced_forward(
    X, local: np.ndarray, plan: TensorPlan, activation: int, head: int, out, allreduce
):
    """``tensor.sliced_forward`` on the GPU: out (n x k float64, host) = the model's outputs on
    the rows of X (host or device); every rank of the tensor group calls it on the same rows."""
    with _LOCK:
        X, d_params = _prepare(X, local, plan)
    m, k = int(X.shape[0]), plan.sizes[-1]
    _host_out(out, (m, k))
    acts, _ = _forward(X, m, d_params, plan, activation, allreduce, 0.0)
    if m:
        with _LOCK:
            d_out = _rows("out", m, k)
            _launch(_kernels().outputs, m, acts[-1], head, d_out)
            d_out.copy_to_host(out)


def sliced_gradient(
    X, y, local: np.ndarray, plan: TensorPlan, activation: int, head: int, out, allreduce, flag=0.0
) -> float:
    """``tensor.sliced_gradient`` on the GPU: out[:n_local] = this rank's slice of the summed
    gradient over the rows of X (host or device), out[n_local] = the loss sum, out[n_local + 1]
    = the rows; ``out`` is a host float64 vector. Returns the flag summed over the group."""
    n, k_out = plan.n_local, plan.sizes[-1]
    with _LOCK:
        X, d_params = _prepare(X, local, plan)
        m = int(X.shape[0])
        if m:
            y2 = kc._device_targets(y, m, k_out, head)
        elif not kc._is_device_array(y):
            targets(y, 0, k_out, head)  # the CPU's check of an empty batch's targets
    if out.dtype != np.float64 or not out.flags.c_contiguous or out.shape != (n + 2,):
        raise ValueError(f"out must be contiguous float64 of length {n + 2}")
    acts, flag = _forward(X, m, d_params, plan, activation, allreduce, flag)
    with _LOCK:
        ks = _kernels()
        grad = _vector("grad", n + 1)  # the slice's gradient, then the loss sum
        delta = _rows("delta_head", m, k_out)
        if m:
            losses = _vector("losses", m)
            _launch(ks.head_loss, m, acts[-1], y2, head, delta, losses)
            ks.sum_losses[1, 1](losses, m, grad, n)
    for index in range(len(plan.layers) - 1, -1, -1):
        L = plan.layers[index]
        with _LOCK:
            entries = (L.n_in + 1) * L.n_out if m else 0  # W's and b's: nb == n_out
            _launch(ks.accumulate, entries, acts[index], delta, grad, L.w0, L.b0)
        if index == 0:
            break
        with _LOCK:
            below = _rows(f"delta{index}", m, L.n_in)
        if L.kind == COLUMN:  # partial sums over the group's slices of this layer's outputs
            host = np.empty(m * L.n_in)
            part = host.reshape(m, L.n_in)
            with _LOCK:
                args = (delta, d_params, L.w0, acts[index], NO_ACTIVATION, below)
                _launch(ks.backprop, m * L.n_in, *args)
                if m:
                    below.copy_to_host(part)
            allreduce(host)
            with _LOCK:
                if m:
                    below.copy_to_device(part)
                _launch(ks.apply_slope, m * L.n_in, below, acts[index], activation)
        else:
            with _LOCK:
                args = (delta, d_params, L.w0, acts[index], activation, below)
                _launch(ks.backprop, m * L.n_in, *args)
        delta = below
    if m:
        with _LOCK:
            grad.copy_to_host(out[: n + 1])
    else:
        out[: n + 1] = 0.0
    out[n + 1] = m
    return flag

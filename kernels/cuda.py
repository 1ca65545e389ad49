"""CUDA backend of the kernel contract (see ``lepton_hpc.kernels``), written with ``numba.cuda``.

Same API and semantics as the CPU backend: ``gradient`` fills a host ``out`` of length P + 2 with
the summed per-row gradient, the summed loss and the row count; ``forward`` fills a host (n, k)
output. X and y may be host arrays or device arrays from ``to_device``: the engine moves a rank's
rows to the GPU once, so a step only uploads ``params`` and downloads P + 1 float64 values.

Design (float32 or float64 data, float64 arithmetic and accumulation everywhere):

* One-layer fast paths (linear / logistic ``(d, 1)``, softmax and multi-output ``(d, k)``, when
  P + 1 <= ``FAST_MAX_ACC``): one thread per row in a grid-stride loop; each thread accumulates
  its rows' gradient and loss in a per-thread local array; the block then reduces those arrays
  in shared memory (a fixed tree, ``RED_CHUNK`` values per pass) and writes ONE partial row per
  block into a (blocks, P + 1) device buffer.
* General kernel (any hidden layers, any widths, and one-layer models too big for the fast
  path): instead of per-thread activation arrays of a compile-time maximum width (which would
  cap the layer width and make every thread carry P accumulators), each block owns a global
  scratch slab (S, threads) holding, for the tile of rows it is working on, every row's hidden
  activations, back-propagated deltas and loss (S = sum of widths + 1; thread index fastest, so
  phase A is coalesced). Phase A: one thread per row runs forward, head and backward into its
  column. Phase B (after a barrier): the block turns parameter-parallel; thread t owns parameter
  indices t, t + threads, ... and adds sum over the tile's rows of (layer input x delta) to its
  own entries of the block's partial row. Every partial entry has exactly one writer, so there
  are no atomics, no width limit, and the order of additions is fixed.
* ``_sum_partials`` then adds the (blocks, P + 1) partial rows column by column in block order:
  the result is bitwise reproducible for a given launch configuration.

Launches use 256 threads per block and min(4 x SMs, ceil(n / 256)) blocks on a GPU (capped so the
general kernel's scratch stays under ``SCRATCH_BYTES``); under the Numba CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, a Python thread per CUDA thread) 32 threads and at most 4 blocks.
Losses are computed stably: log-loss as max(z, 0) - y z + log1p(exp(-|z|)), softmax after
subtracting the row maximum; a softmax label outside 0..k-1 gives a NaN loss, never an
out-of-bounds read.
"""

from __future__ import annotations

import numpy as np

from . import BINARY, RELU, SIGMOID, SOFTMAX, SQUARED, TANH, param_count
from .cuda_device import _A_OFF, _D_OFF, _P_OFF, _SIZES, FAST_MAX_ACC, MAX_TPB, _kernels

try:  # numba.cuda imports without a GPU; only a numba built without CUDA support lacks it.
    from numba import cuda
except ImportError:  # pragma: no cover - depends on the numba build
    cuda = None

GPU_TPB = 256  # threads per block on a real GPU
BLOCKS_PER_SM = 4  # blocks per multiprocessor for the grid-stride loops
SIM_TPB = 32  # the simulator runs one Python thread per CUDA thread: keep launches small
SIM_MAX_BLOCKS = 4
SCRATCH_BYTES = 256 << 20  # cap on the general kernel's per-block scratch slabs

_buffers: dict[str, object] = {}  # reusable device buffers, one per purpose (see _buffer)
_layouts: dict[tuple[int, ...], object] = {}  # device copies of layout tables, per sizes


# ---- availability and placement ----------------------------------------------------------------
def using_simulator() -> bool:
    """True when numba.cuda is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` at numba import)."""
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def is_available() -> bool:
    """True when numba.cuda sees a usable GPU, or the simulator is enabled."""
    return cuda is not None and bool(cuda.is_available())


def _require() -> None:
    """Raise a clear error before any numba.cuda call when there is nothing to run on."""
    if not is_available():
        raise RuntimeError(
            "the CUDA kernels need a GPU that numba.cuda can use, or NUMBA_ENABLE_CUDASIM=1"
        )


def select_device(node_local_rank: int) -> int:
    """Bind this process to GPU ``node_local_rank % count``; return that GPU's id."""
    _require()
    count = len(cuda.gpus)
    if count < 1:
        raise RuntimeError("numba.cuda reports no GPUs on this node")
    dev = int(node_local_rank) % count
    cuda.select_device(dev)
    _buffers.clear()
    _layouts.clear()
    return dev


def _is_device_array(a) -> bool:
    return bool(getattr(a, "__cuda_ndarray__", False)) or hasattr(a, "__cuda_array_interface__")


def to_device(array):
    """A C-contiguous device copy of a host array (device arrays are returned as they are)."""
    _require()
    if _is_device_array(array):
        return _as_numba_device(array)
    return cuda.to_device(np.ascontiguousarray(array))


def _as_numba_device(a):
    """Numba's own device array for ``a`` (wraps other libraries' CUDA arrays without a copy)."""
    if getattr(a, "__cuda_ndarray__", False):
        return a
    return cuda.as_cuda_array(a)


# ---- host side: validation, layout, launch configuration ---------------------------------------
def _check_model(params, sizes, activation: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and codes; return contiguous float64 params and int64 sizes."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size < 2 or np.any(sizes < 1):
        raise ValueError(f"sizes must be >= 2 positive widths, got {sizes}")
    params = np.ascontiguousarray(params, dtype=np.float64)
    if params.shape != (param_count(sizes),):
        raise ValueError(f"params must have length {param_count(sizes)}, got {params.shape}")
    if head not in (SQUARED, BINARY, SOFTMAX) or activation not in (SIGMOID, TANH, RELU):
        raise ValueError(f"unknown head {head} or activation {activation}")
    if head == BINARY and sizes[-1] != 1:
        raise ValueError("the BINARY head needs one output")
    return params, sizes


def _check_rows(X, d: int):
    """X as a 2-D float32/float64 array: device arrays as they are, host ones C-contiguous."""
    if _is_device_array(X):
        X = _as_numba_device(X)
        if X.dtype not in (np.float32, np.float64):
            raise ValueError(f"X on the GPU must be float32 or float64, got {X.dtype}")
    else:
        X = np.asarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
    if len(X.shape) != 2 or X.shape[1] != d:
        raise ValueError(f"X must be (n, {d}), got {tuple(X.shape)}")
    return X if _is_device_array(X) else np.ascontiguousarray(X)


def _upload(a):
    """A device copy of a host array; device arrays pass through (no copy)."""
    return a if _is_device_array(a) else cuda.to_device(a)


def _device_targets(y, n: int, k: int, head: int):
    """y on the GPU as (n, k) for SQUARED or (n, 1) for labels; host y is uploaded here."""
    cols = k if head == SQUARED else 1
    if not _is_device_array(y):
        y = np.asarray(y)
        if y.dtype not in (np.float32, np.float64):
            y = y.astype(np.float64)
    else:
        y = _as_numba_device(y)
    shape = tuple(y.shape)
    if (
        int(np.prod(shape)) != n * cols
        or len(shape) > 2
        or (len(shape) == 2 and shape != (n, cols))
    ):
        raise ValueError(f"y must have {n} rows of {cols} target(s), got shape {shape}")
    if _is_device_array(y):
        return y.reshape(n, cols)
    return cuda.to_device(np.ascontiguousarray(y).reshape(n, cols))


def _layout(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """(4, L + 1) int64 table: widths, param offsets, activation and delta offsets; slab width S.

    Per row the scratch column holds hidden activations a_1..a_{L-1}, then deltas d_1..d_L (d_L
    first holds the logits), then the loss: S = sum(hidden) + sum(sizes[1:]) + 1.
    """
    n_layers = sizes.size - 1
    lay = np.zeros((4, n_layers + 1), dtype=np.int64)
    lay[_SIZES] = sizes
    at = 0
    for layer in range(n_layers):
        lay[_P_OFF, layer] = at
        at += int(sizes[layer]) * int(sizes[layer + 1]) + int(sizes[layer + 1])
    lay[_P_OFF, n_layers] = at
    at = 0
    for layer in range(1, n_layers):
        lay[_A_OFF, layer] = at
        at += int(sizes[layer])
    for layer in range(1, n_layers + 1):
        lay[_D_OFF, layer] = at
        at += int(sizes[layer])
    return lay, at + 1


def _device_layout(sizes: np.ndarray) -> tuple[object, int]:
    """The layout table on the GPU, uploaded once per distinct ``sizes``."""
    key = tuple(int(s) for s in sizes)
    lay, width = _layout(sizes)
    if key not in _layouts:
        _layouts[key] = cuda.to_device(lay)
    return _layouts[key], width


def _buffer(name: str, shape: tuple[int, ...], dtype=np.float64):
    """A device buffer reused across calls while its shape (and dtype) stays the same."""
    buf = _buffers.get(name)
    if buf is None or tuple(buf.shape) != shape or buf.dtype != np.dtype(dtype):
        buf = cuda.device_array(shape, dtype=dtype)
        _buffers[name] = buf
    return buf


def _rows_buffer(name: str, rows: int, cols: int, dtype):
    """The first ``rows`` rows of a reused (capacity, cols) device buffer (grown when needed)."""
    buf = _buffers.get(name)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != np.dtype(dtype):
        buf = cuda.device_array((max(rows, 1), cols), dtype=dtype)
        _buffers[name] = buf
    return buf[:rows]


def _sm_count() -> int:
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def _launch(n: int, threads_per_block: int | None, max_blocks: int | None) -> tuple[int, int]:
    """(blocks, threads per block) for n rows: power-of-two blocks, grid-stride over the rest."""
    sim = using_simulator()
    tpb = int(threads_per_block or (SIM_TPB if sim else GPU_TPB))
    if tpb < 1 or tpb > MAX_TPB or tpb & (tpb - 1):
        raise ValueError(f"threads_per_block must be a power of two <= {MAX_TPB}, got {tpb}")
    if max_blocks is None:
        max_blocks = SIM_MAX_BLOCKS if sim else BLOCKS_PER_SM * _sm_count()
    return max(1, min(int(max_blocks), -(-n // tpb))), tpb


def _scratch_blocks(blocks: int, tpb: int, width: int) -> int:
    """Blocks limited so that the general kernel's scratch slabs fit in ``SCRATCH_BYTES``."""
    return max(1, min(blocks, SCRATCH_BYTES // (width * tpb * 8)))


def _choose_kernel(sizes: np.ndarray, head: int, n_params: int) -> str:
    """'glm1', 'glmk' (one-layer fast paths) or 'mlp' (general)."""
    if sizes.size == 2 and n_params + 1 <= FAST_MAX_ACC:
        return "glm1" if sizes[1] == 1 and head != SOFTMAX else "glmk"
    return "mlp"


# ---- public API --------------------------------------------------------------------------------
def gradient(
    X,
    y,
    params,
    sizes,
    activation: int,
    head: int,
    out: np.ndarray,
    *,
    threads_per_block: int | None = None,
    max_blocks: int | None = None,
) -> None:
    """out[:P] = sum of per-row loss gradients, out[P] = sum of losses, out[P+1] = n (host out).

    ``threads_per_block`` / ``max_blocks`` override the launch configuration (tests, tuning).
    """
    _require()
    params, sizes = _check_model(params, sizes, activation, head)
    n_params = params.size
    if out.shape != (n_params + 2,) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of length {n_params + 2}")
    X = _check_rows(X, int(sizes[0]))
    n = int(X.shape[0])
    out[:] = 0.0
    if n == 0:
        return
    y2 = _device_targets(y, n, int(sizes[-1]), head)
    blocks, tpb = _launch(n, threads_per_block, max_blocks)
    partial = _run_gradient(_upload(X), y2, params, sizes, activation, head, blocks, tpb)
    result = _buffer("result", (n_params + 1,))
    _kernels().sum_partials[-(-(n_params + 1) // tpb), tpb](partial, result)
    out[: n_params + 1] = result.copy_to_host()
    out[n_params + 1] = n


def _run_gradient(X, y2, params, sizes, activation, head, blocks, tpb):
    """Launch the gradient kernel that fits the model; return its (blocks, P + 1) partials."""
    ks = _kernels()
    n_params = params.size
    d_params = cuda.to_device(params)
    kind = _choose_kernel(sizes, head, n_params)
    if kind == "mlp":
        lay, width = _device_layout(sizes)
        blocks = _scratch_blocks(blocks, tpb, width)
        scratch = _buffer("grad_scratch", (blocks, width, tpb))
        partial = _buffer("partial", (blocks, n_params + 1))
        n_layers = sizes.size - 1
        ks.grad_mlp[blocks, tpb](X, y2, d_params, lay, n_layers, activation, head, scratch, partial)
        return partial
    partial = _buffer("partial", (blocks, n_params + 1))
    if kind == "glm1":
        ks.grad_glm1[blocks, tpb](X, y2, d_params, head, partial)
    else:
        ks.grad_glmk[blocks, tpb](X, y2, d_params, int(sizes[-1]), head, partial)
    return partial


def gather_rows(X, y, rows: np.ndarray):
    """``X[rows], y[rows]`` of device arrays, gathered on the GPU into reused device buffers.

    The training data is placed on the GPU once (``to_device``) and stays there across epochs;
    per mini-batch step only the row numbers go up (8 bytes a row) and the gradient buffer
    comes back. The arrays returned are valid until the next call.
    """
    _require()
    X, y = _as_numba_device(X), _as_numba_device(y)
    m = int(rows.size)
    y2 = y.reshape(y.shape[0], 1) if len(y.shape) == 1 else y
    xb = _rows_buffer("take_x", m, int(X.shape[1]), X.dtype)
    yb = _rows_buffer("take_y", m, int(y2.shape[1]), y2.dtype)
    if m:
        d_rows = cuda.to_device(np.ascontiguousarray(rows, dtype=np.int64))
        blocks, tpb = _launch(m * (int(X.shape[1]) + int(y2.shape[1])), None, None)
        _kernels().take_rows[blocks, tpb](X, y2, d_rows, xb, yb)
    return xb, (yb.reshape(m) if len(y.shape) == 1 else yb)


def forward(
    X,
    params,
    sizes,
    activation: int,
    head: int,
    out: np.ndarray,
    *,
    threads_per_block: int | None = None,
    max_blocks: int | None = None,
) -> None:
    """out (n, k) float64 on the host = model output: value, P(class 1) or class probabilities."""
    _require()
    params, sizes = _check_model(params, sizes, activation, head)
    X = _check_rows(X, int(sizes[0]))
    n, k = int(X.shape[0]), int(sizes[-1])
    if out.shape != (n, k) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of shape ({n}, {k})")
    if n == 0:
        return
    blocks, tpb = _launch(n, threads_per_block, max_blocks)
    lay, width = _device_layout(sizes)
    blocks = _scratch_blocks(blocks, tpb, width)
    scratch = _buffer("fwd_scratch", (blocks, width, tpb))
    d_out = _buffer("fwd_out", (n, k))
    n_layers = sizes.size - 1
    _kernels().forward_rows[blocks, tpb](
        _upload(X), cuda.to_device(params), lay, n_layers, activation, head, scratch, d_out
    )
    out[...] = d_out.copy_to_host()


def loss_sum(X, y, params, sizes, activation: int, head: int) -> float:
    """Sum over rows of the loss (for parity with the CPU backend; runs the gradient kernel)."""
    params = np.ascontiguousarray(params, dtype=np.float64)
    out = np.empty(params.size + 2, dtype=np.float64)
    gradient(X, y, params, sizes, activation, head, out)
    return float(out[params.size])

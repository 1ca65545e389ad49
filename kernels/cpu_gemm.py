"""MLP passes as float64 BLAS GEMMs over blocks of rows (the CPU backend's path for wide layers).

A dense layer's product over a block of rows is a matrix product: NumPy's BLAS runs it at
several times the rate of the row-at-a-time loop nests of ``cpu_passes`` once layers are a few
dozen units wide (60-70 GFLOP/s a core here in float64, 120-150 in float32, against 15-45 for
the loop nests). By default every product and sum is float64 (float32 rows are widened into the
block buffer first), so results agree with the float64 reference to rounding, as the loop nests
do; ``products = float32`` multiplies in float32 and sums each block's results in float64.

Work split, the same rule as ``cpu``: rows are cut into blocks whose size depends only on n and
the model, blocks are grouped into chunks, each chunk sums its blocks in order into its own
partial row, and the partial rows are added in chunk order. Each GEMM runs on one BLAS thread
inside a worker thread (BLAS and the Numba helpers release the GIL), so the bits never depend on
the thread count.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from .cpu_layers import _combine_columns
from .reference import _activate, _head, _slope

BLOCK_FLOATS = 1 << 16  # a block's activations (rows x sum of widths): 512 KiB of float64
MIN_BLOCK, MAX_BLOCK = 64, 1024
MAX_CHUNKS = 64  # partial rows of the gradient (each P + 1 floats) held at once
SMALL_SPLIT = 4  # a small batch is cut into this many blocks, so that threads share it...
MIN_BLOCK_FLOPS = 2e7  # ...but no block does less work than this (about 0.2-0.3 ms here):
# below it the hand-over between threads costs more than it saves


# ---- element-wise steps between the products (Numba, no GIL) ------------------------------------
@njit(nogil=True, cache=True)
def _bias_activate(z, b, activation, last):
    """z += b row by row, then the hidden activation (not for the logits: ``last``)."""
    m, w = z.shape
    for i in range(m):
        for o in range(w):
            v = np.float64(z[i, o]) + np.float64(b[o])  # float32 buffers: one rounding
            z[i, o] = v if last else _activate(v, activation)


@njit(nogil=True, cache=True)
def _head_rows(z, Y, r0, head, delta):
    """Sum of the block's losses from its logits z (m x k); delta = d loss / d z."""
    m, k = z.shape
    loss = 0.0
    for i in range(m):
        loss += _head(z[i], 0, k, Y[r0 + i], head, delta[i])
    return loss


@njit(nogil=True, cache=True)
def _slope_rows(below, act, activation):
    """below *= act'(.), the slope written with the activation's outputs ``act``."""
    m, w = below.shape
    for i in range(m):
        for j in range(w):
            below[i, j] *= _slope(act[i, j], activation)


@njit(nogil=True, cache=True)
def _add_block(gW, prod, gb, delta, mode):
    """Add a block's gradient into a chunk's float64 sums: gW += prod (the block's W gradient),
    gb += the column sums of delta (its bias gradient). ``mode`` 0: add; 1: the chunk's first
    block, whose product was written into gW itself; 2: the first block, prod copied (widened)."""
    if mode == 0:
        for j in range(gW.shape[0]):
            for o in range(gW.shape[1]):
                gW[j, o] += prod[j, o]
    elif mode == 2:
        for j in range(gW.shape[0]):
            for o in range(gW.shape[1]):
                gW[j, o] = prod[j, o]
    if mode != 0:
        gb[:] = 0.0
    for i in range(delta.shape[0]):
        for o in range(delta.shape[1]):
            gb[o] += delta[i, o]


@njit(nogil=True, cache=True)
def _widen(src, r0, m, dst):
    """dst[:m] = rows r0..r0+m of src as float64."""
    for i in range(m):
        for j in range(src.shape[1]):
            dst[i, j] = src[r0 + i, j]


# ---- the plan -----------------------------------------------------------------------------------
def plan(n: int, sizes) -> tuple[int, int, int]:
    """(rows per block, blocks per chunk, chunks) for n rows: from n and the model only."""
    widths = int(np.sum(sizes))
    flops_per_row = 6 * sum(a * b for a, b in itertools.pairwise(sizes))
    block = min(MAX_BLOCK, max(MIN_BLOCK, BLOCK_FLOATS // widths))
    smallest = min(block, max(MIN_BLOCK, int(MIN_BLOCK_FLOPS // flops_per_row)))
    block = max(smallest, min(block, -(-n // SMALL_SPLIT)))
    n_blocks = -(-n // block)
    per = -(-n_blocks // MAX_CHUNKS)
    return block, per, -(-n_blocks // per)


def _layers(params, sizes, dtype=np.float64):
    """(W (n_in x n_out), b, gradient offset) of each layer of the flat vector: views, or for
    float32 products one float32 copy of the weights (biases stay float64: they are added in
    float64 before the activation)."""
    narrow = params.astype(dtype) if dtype != np.float64 else params
    out, p0 = [], 0
    for n_in, n_out in itertools.pairwise(sizes):
        nw = n_in * n_out
        out.append(
            (narrow[p0 : p0 + nw].reshape(n_in, n_out), params[p0 + nw : p0 + nw + n_out], p0)
        )
        p0 += nw + n_out
    return out


class _Buffers:
    """One worker's block buffers (activations, deltas, product) in the products' dtype, kept
    between calls."""

    def __init__(self, block: int, sizes: list[int], dtype) -> None:
        self.acts = [np.empty((block, w), dtype) for w in sizes]
        wide = max(sizes)
        self.delta = np.empty((block, wide), dtype)
        self.below = np.empty((block, wide), dtype)
        self.prod = np.empty(max(a * b for a, b in itertools.pairwise(sizes)), dtype)


_local = threading.local()


def _buffers(block: int, sizes: list[int], dtype) -> _Buffers:
    key = (block, tuple(sizes), np.dtype(dtype))
    if getattr(_local, "key", None) != key:
        _local.key, _local.buf = key, _Buffers(block, sizes, dtype)
    return _local.buf


def _forward_block(X, r0, m, layers, activation, buf):
    """buf.acts[l][:m] = layer l's input for rows r0..r0+m (l = 0: the rows, in the products'
    dtype; float32 rows are used in place for float32 products); the last entry holds the
    logits. Returns layer 0's input."""
    dtype = buf.acts[0].dtype
    if X.dtype == dtype:
        a = X[r0 : r0 + m]
    else:
        a = buf.acts[0][:m]
        _widen(X, r0, m, a)
    last = len(layers) - 1
    for index, (W, b, _) in enumerate(layers):
        z = buf.acts[index + 1][:m]
        np.matmul(a, W, out=z)
        _bias_activate(z, b, activation, index == last)
        if index == 0:
            rows = a
        a = z
    return rows


def _chunk_gradient(X, Y, layers, sizes, activation, head, r0, r1, block, partial):
    """partial[:P] = the gradient of rows r0..r1, partial[P] = their loss (blocks in order)."""
    dtype = layers[0][0].dtype
    buf = _buffers(block, sizes, dtype)
    P = partial.size - 1
    loss = 0.0
    for s in range(r0, r1, block):
        m = min(block, r1 - s)
        a0 = _forward_block(X, s, m, layers, activation, buf)
        k = sizes[-1]
        delta = buf.delta[:m, :k]
        loss += _head_rows(buf.acts[-1][:m], Y, s, head, delta)
        for index in range(len(layers) - 1, -1, -1):
            W, _, p0 = layers[index]
            n_in, n_out = W.shape
            src = a0 if index == 0 else buf.acts[index][:m]
            gW = partial[p0 : p0 + n_in * n_out].reshape(n_in, n_out)
            # float64: the chunk's first block writes its product in place (no zeroing, no
            # addition); float32 products are widened into the float64 sums
            in_place = s == r0 and dtype == np.float64
            prod = gW if in_place else buf.prod[: n_in * n_out].reshape(n_in, n_out)
            np.matmul(src.T, delta, out=prod)
            gb = partial[p0 + n_in * n_out : p0 + n_in * n_out + n_out]
            _add_block(gW, prod, gb, delta, 1 if in_place else (2 if s == r0 else 0))
            if index == 0:
                break
            below = (buf.below if delta.base is buf.delta else buf.delta)[:m, :n_in]
            np.matmul(delta, W.T, out=below)
            _slope_rows(below, src, activation)
            delta = below
    partial[P] = loss


def combine(partial: np.ndarray, out: np.ndarray) -> None:
    """out = the chunks' partial rows added in chunk order, column ranges on the worker threads
    (``cpu._combine``'s loop and bits without Numba's thread pool, whose workers would spin
    beside the BLAS threads of the next call)."""
    width = partial.shape[1]
    threads = numba.get_num_threads()
    pieces = threads if width >= 65536 else 1
    step = -(-width // pieces)

    def task(lo):
        return lambda: _combine_columns(partial, out, lo, min(width, lo + step))

    _run([task(lo) for lo in range(0, width, step)], threads)


# ---- threads ------------------------------------------------------------------------------------
_pool: list = [None, 0]
_blas = [0]


def blas_threads(n: int) -> None:
    """Set BLAS's thread count (process-wide; only when it changes: the call is not free).
    The GEMMs here run on one BLAS thread each, inside worker threads; the tensor-parallel
    slices give BLAS the rank's threads."""
    if _blas[0] != n:
        threadpool_limits(limits=n, user_api="blas")
        _blas[0] = n


def _run(tasks, threads: int) -> None:
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    if _pool[1] != threads:
        if _pool[0] is not None:
            _pool[0].shutdown(wait=True)
        _pool[0], _pool[1] = ThreadPoolExecutor(threads, thread_name_prefix="lepton-gemm"), threads
    for future in [_pool[0].submit(task) for task in tasks]:
        future.result()


def gradient_partials(
    X, Y, params, sizes, activation: int, head: int, products=np.float64
) -> np.ndarray:
    """The per-chunk partial rows (gradient, loss) of rows X, to be added in chunk order.
    ``products``: the dtype of the GEMMs (float32: float32 products and activations, each
    block's sums added into float64)."""
    n = X.shape[0]
    widths = [int(s) for s in sizes]
    block, per, n_chunks = plan(n, widths)
    layers = _layers(params, widths, products)
    partial = np.empty((n_chunks, params.size + 1))
    rows = per * block
    blas_threads(1)

    def task(c):
        return lambda: _chunk_gradient(
            X,
            Y,
            layers,
            widths,
            activation,
            head,
            c * rows,
            min(n, (c + 1) * rows),
            block,
            partial[c],
        )

    _run([task(c) for c in range(n_chunks)], numba.get_num_threads())
    return partial

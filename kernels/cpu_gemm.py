"""MLP passes as float64 BLAS GEMMs over blocks of rows (the CPU backend's path for wide layers).

A dense layer's product over a block of rows is a matrix product: BLAS runs it at
several times the rate of the row-at-a-time loop nests of ``cpu_passes`` once layers are a few
dozen units wide (60-70 GFLOP/s a core here in float64, 120-150 in float32, against 15-45 for
the loop nests). By default every product and sum is float64 (float32 rows are widened into the
block buffer first), so results agree with the float64 reference to rounding, as the loop nests
do; ``products = float32`` multiplies in float32 and sums each block's results in float64.

Work split, the same rule as ``cpu``: rows are cut into blocks whose size depends only on n, the
model and the products' dtype, blocks are grouped into chunks, each chunk sums its blocks in
order into its own partial row, and the partial rows are added in chunk order. A chunk is one
Numba function (``_chunk``), run by the rank's Numba threads (``_chunks``, a ``prange`` over the
chunks, each thread with buffers of its own); its GEMMs are SciPy's BLAS (Numba's ``np.dot``)
on one BLAS thread, so the bits never depend on the thread count.

Why Numba's threads and not a pool of Python threads: on a virtual machine, handing a task to a
sleeping thread and waiting for its result cost 63-70 us a round trip
(``ThreadPoolExecutor.submit(...).result()``), every call; Numba's OpenMP workers spin briefly
between parallel regions. A mini-batch step of 256 rows of a 256-64-32-1 network took 272-340
us through such a pool and 218-220 us on Numba's threads (float32 products, 2 threads), the
same bits.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

from . import BINARY
from .cpu_layers import _combine, _combine_columns
from .reference import _activate, _head, _slope

BLOCK_BYTES = 1 << 19  # a block's activations (rows x sum of widths) in the products' dtype
MIN_BLOCK, MAX_BLOCK = 64, 1024
MAX_CHUNKS = 64  # partial rows of the gradient (each P + 1 floats) held at once
FEW_BLOCKS = 4  # a batch of at most this many blocks is cut into 2 or 4, so that threads share it,
MIN_BLOCK_FLOPS = 2e7  # but into no more than its work in blocks of this (0.2-0.3 ms here),
# rounded up: below that the hand-over between threads costs more than it saves


# ---- one chunk of rows: products and the steps between them, compiled as one function ----------
OUTPUT_LOOPS = 16  # output layers this narrow run as float64 loops (below), wider ones as GEMMs


@njit(nogil=True, cache=True)
def _chunk(X, Y, W, b, WT, sizes, at_layer, activation, head, r0, r1, block, bufs, f64, partial):
    """partial[:P] = the gradient of rows r0..r1, partial[P] = their loss, block by block in
    order (the chunk's first block writes the sums, the later ones add to them).

    ``W``: the parameter vector in the products' dtype, read for the hidden layers' weights
    (layer l's n_in x n_out from ``at_layer[l]``); ``b``: the same vector in float64, read for
    the biases; ``partial`` has the same layout. ``WT``: the output layer's weights transposed
    (k x n_in, float64). ``bufs``: the activations of every layer (layer l's block from
    ``block`` times the widths before it), two delta buffers and the product of a weight
    gradient, in the products' dtype; ``f64``: the block's logits and their deltas, float64.

    The hidden layers' products are GEMMs: Numba's ``np.dot``, SciPy's BLAS. An output layer of
    at most ``OUTPUT_LOOPS`` units (a GEMV's work) runs as float64 loops whatever the products'
    dtype: with float32 products the logits, the head and the output layer's gradient then
    round only once (the worst gradient error against the float64 reference over the tests'
    problems: 9.1e-7 before, 5.9e-7 now). Nothing between the products returns to Python:
    the chunk holds no lock while it runs (a Python loop over these steps, holding the GIL
    between them, ran 1.3x slower on a 32-64-32-1 network)."""
    acts, da, db, prod = bufs
    layers = sizes.size - 1
    k, n_last = sizes[layers], sizes[layers - 1]
    loops = k <= OUTPUT_LOOPS
    loss = 0.0
    for s in range(r0, r1, block):
        m = min(block, r1 - s)
        first = s == r0
        a = acts[: m * sizes[0]].reshape(m, sizes[0])
        for i in range(m):  # the rows, widened or narrowed into the products' dtype
            for j in range(sizes[0]):
                a[i, j] = X[s + i, j]
        at = block * sizes[0]
        for layer in range(layers - 1 if loops else layers):
            n_in, n_out, w0 = sizes[layer], sizes[layer + 1], at_layer[layer]
            z = acts[at : at + m * n_out].reshape(m, n_out)
            np.dot(a, W[w0 : w0 + n_in * n_out].reshape(n_in, n_out), z)
            bias = b[w0 + n_in * n_out : w0 + n_in * n_out + n_out]
            last = layer == layers - 1
            for i in range(m):
                for o in range(n_out):
                    v = np.float64(z[i, o]) + bias[o]  # float32 buffers: one rounding
                    z[i, o] = v if last else _activate(v, activation)
            a = z
            at += block * n_out
        logits = f64[: m * k].reshape(m, k)
        w0 = at_layer[layers - 1]
        if loops:  # a: the last hidden layer's outputs
            bias = b[w0 + n_last * k : w0 + n_last * k + k]
            for i in range(m):
                for o in range(k):
                    v = bias[o]
                    for j in range(n_last):
                        v += np.float64(a[i, j]) * WT[o, j]
                    logits[i, o] = v
        else:  # a: the logits in the products' dtype
            at -= block * k
            for i in range(m):
                for o in range(k):
                    logits[i, o] = a[i, o]
        d64 = f64[block * k : block * k + m * k].reshape(m, k)
        loss += _head_block(logits, Y, s, head, d64)
        # the output layer's gradient
        src = acts[at - block * n_last : at - block * n_last + m * n_last].reshape(m, n_last)
        nw = n_last * k
        gW = partial[w0 : w0 + nw]
        _bias_gradient(d64, partial[w0 + nw : w0 + nw + k], first)
        if loops:
            if first:
                gW[:] = 0.0
            for i in range(m):
                for o in range(k):
                    d = d64[i, o]
                    for j in range(n_last):
                        gW[j * k + o] += np.float64(src[i, j]) * d
        else:
            delta = da[: m * k].reshape(m, k)
            for i in range(m):
                for o in range(k):
                    delta[i, o] = d64[i, o]
            _gemm_gradient(src, delta, prod, gW, first)
        below = db[: m * n_last].reshape(m, n_last)
        if loops:
            row = f64[2 * block * k : 2 * block * k + n_last]
            for i in range(m):
                row[:] = 0.0
                for o in range(k):
                    d = d64[i, o]
                    for j in range(n_last):
                        row[j] += d * WT[o, j]
                for j in range(n_last):
                    below[i, j] = row[j] * _slope(np.float64(src[i, j]), activation)
        else:
            np.dot(delta, W[w0 : w0 + nw].reshape(n_last, k).T, below)
            _slope_block(below, src, activation)
        delta = below
        use_da = True  # the next layer's delta goes into da, then db, ...
        for layer in range(layers - 2, -1, -1):
            n_in, n_out, w0 = sizes[layer], sizes[layer + 1], at_layer[layer]
            at -= block * n_out
            src = acts[at - block * n_in : at - block * n_in + m * n_in].reshape(m, n_in)
            nw = n_in * n_out
            _gemm_gradient(src, delta, prod, partial[w0 : w0 + nw], first)
            _bias_gradient(delta, partial[w0 + nw : w0 + nw + n_out], first)
            if layer == 0:
                break
            below = (da if use_da else db)[: m * n_in].reshape(m, n_in)
            use_da = not use_da
            np.dot(delta, W[w0 : w0 + nw].reshape(n_in, n_out).T, below)
            _slope_block(below, src, activation)
            delta = below
    partial[partial.size - 1] = loss


@njit(parallel=True, nogil=True, cache=True)
def _chunks(X, Y, W, b, WT, sizes, at, act, head, n, rows, block, bufs, partial):
    """``_chunk`` of each chunk c (rows c * rows .. c * rows + rows - 1, up to n) into
    partial[c], the chunks shared by the rank's threads. ``bufs``: ``_chunk``'s buffers, one
    row per thread (each thread uses the row of its thread number)."""
    acts, da, db, prod, f64 = bufs
    for c in prange(partial.shape[0]):
        t = numba.get_thread_id()
        r0 = c * rows
        r1 = min(n, r0 + rows)
        mine = (acts[t], da[t], db[t], prod[t])
        _chunk(X, Y, W, b, WT, sizes, at, act, head, r0, r1, block, mine, f64[t], partial[c])


@njit(nogil=True, cache=True)
def _gemm_gradient(src, delta, prod, gW, first):
    """gW (float64, flat) = or += src^T delta: one GEMM in the products' dtype."""
    nw = src.shape[1] * delta.shape[1]
    np.dot(src.T, delta, prod[:nw].reshape(src.shape[1], delta.shape[1]))
    if first:
        for q in range(nw):
            gW[q] = prod[q]
    else:
        for q in range(nw):
            gW[q] += prod[q]


@njit(nogil=True, cache=True)
def _bias_gradient(delta, gb, first):
    """gb (float64) = or += the column sums of delta: a layer's bias gradient."""
    if first:
        gb[:] = 0.0
    for i in range(delta.shape[0]):
        for o in range(delta.shape[1]):
            gb[o] += delta[i, o]


@njit(nogil=True, cache=True)
def _slope_block(below, act, activation):
    """below *= act'(.), the slope written with the activation's outputs ``act``."""
    for i in range(below.shape[0]):
        for j in range(below.shape[1]):
            below[i, j] *= _slope(act[i, j], activation)


@njit(nogil=True, cache=True)
def _head_block(logits, Y, r0, head, delta):
    """Sum of the block's losses from its float64 logits; delta = d loss / d logits."""
    loss = 0.0
    if head == BINARY:  # ``reference._head``'s loss and slope, one exponential a row
        for i in range(logits.shape[0]):
            v, t = logits[i, 0], Y[r0 + i, 0]
            e = math.exp(-abs(v))
            loss += max(v, 0.0) - t * v + math.log1p(e)
            delta[i, 0] = (1.0 / (1.0 + e) if v >= 0.0 else e / (1.0 + e)) - t
        return loss
    for i in range(logits.shape[0]):
        loss += _head(logits[i], 0, logits.shape[1], Y[r0 + i], head, delta[i])
    return loss


# ---- the plan -----------------------------------------------------------------------------------
def plan(n: int, sizes, itemsize: int = 8) -> tuple[int, int, int]:
    """(rows per block, blocks per chunk, chunks) for n rows: from n, the model and the size of
    the products' dtype only (``itemsize``; float32 blocks hold twice the rows). Kept for the
    shapes last asked for: a mini-batch step asks the same each time.

    Blocks are of equal size to a row. A batch of a few blocks (a mini-batch) is cut into a power
    of two of them, 2 at least, so that two or four threads share it evenly: a 256-row batch of
    a 256-256-256-1 network with float32 products is two blocks of 128 rows (it was four of 64,
    1.07-1.22x slower), one of 256-64-32-1 two of 128 (it was 180 + 76, 1.2x slower)."""
    return _plan(n, tuple(int(s) for s in sizes), itemsize)


@functools.lru_cache(maxsize=64)
def _plan(n: int, sizes: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    widths = sum(sizes)
    flops_per_row = 6 * sum(a * b for a, b in itertools.pairwise(sizes))
    limit = min(MAX_BLOCK, max(MIN_BLOCK, BLOCK_BYTES // (itemsize * widths)))
    smallest = min(limit, max(MIN_BLOCK, int(MIN_BLOCK_FLOPS // flops_per_row)))
    n_blocks = max(1, -(-n // limit))
    if n_blocks <= FEW_BLOCKS:
        shared = max(2, 1 << (n_blocks - 1).bit_length())
        n_blocks = max(n_blocks, min(shared, -(-n // smallest)))
    block = max(1, -(-n // n_blocks))
    per = -(-n_blocks // MAX_CHUNKS)
    return block, per, -(-n_blocks // per)


@functools.lru_cache(maxsize=64)
def _offsets(sizes: tuple[int, ...]) -> np.ndarray:
    """Where each layer's weights start in the parameter vector, and its end (never written:
    kept writable, as ``_chunks``' compiled signature has it)."""
    return np.array([0, *itertools.accumulate(a * b + b for a, b in itertools.pairwise(sizes))])


def _weights(params, sizes, dtype):
    """(the parameters in the products' dtype, in float64, the output layer's weights
    transposed, each layer's offset) for ``_chunk``: read-only views, or a float32 copy
    (read-only too: one compiled signature per dtype). The copy goes into an array the calling
    thread keeps between calls: a fresh one each step paid its pages again (a 256-256-256-1
    network's 140k parameters: 46 us a step for ``astype``)."""
    at = _offsets(tuple(sizes))
    b = params.view()
    b.flags.writeable = False
    if dtype != np.float64:
        W = getattr(_local, "narrow", None)
        if W is None or W.size != params.size or W.dtype != dtype:
            W = _local.narrow = np.empty(params.size, dtype)
        W.flags.writeable = True
        np.copyto(W, params, casting="same_kind")
        W.flags.writeable = False
    else:
        W = b
    n_in, k = sizes[-2], sizes[-1]
    WT = np.ascontiguousarray(params[at[-2] : at[-2] + n_in * k].reshape(n_in, k).T)
    return W, b, WT, at[:-1]


class _Buffers:
    """The block buffers of each of ``threads`` threads, kept between calls: activations of
    every layer, two deltas and one product in the products' dtype; logits, their deltas and
    one row in float64 (one row of each array a thread)."""

    def __init__(self, block: int, sizes: list[int], dtype, threads: int) -> None:
        wide = max(sizes)
        product = max(a * b for a, b in itertools.pairwise(sizes))
        self.bufs = (
            np.empty((threads, block * sum(sizes)), dtype),
            np.empty((threads, block * wide), dtype),
            np.empty((threads, block * wide), dtype),
            np.empty((threads, product), dtype),
            np.empty((threads, 2 * block * sizes[-1] + sizes[-2])),
        )


_local = threading.local()  # each calling thread's buffers: callers never share them


def _buffers(block: int, sizes: list[int], dtype, threads: int) -> _Buffers:
    key = (block, tuple(sizes), np.dtype(dtype), threads)
    if getattr(_local, "key", None) != key:
        _local.key, _local.buf = key, _Buffers(block, sizes, dtype, threads)
    return _local.buf


def combine(partial: np.ndarray, out: np.ndarray) -> None:
    """out = the chunks' partial rows added in chunk order (``cpu._combine``'s bits): on the
    rank's threads, tiles of columns each, for wide rows; on the calling thread otherwise."""
    width = partial.shape[1]
    if width >= 65536 and numba.get_num_threads() > 1:
        _combine(partial, out)
    else:
        _combine_columns(partial, out, 0, width)


# ---- threads ------------------------------------------------------------------------------------
_blas = [0]


def blas_threads(n: int) -> None:
    """Set BLAS's thread count (process-wide; only when it changes: the call is not free).
    The GEMMs here run on one BLAS thread each, inside the rank's threads; the tensor-parallel
    slices give BLAS the rank's threads. SciPy's BLAS, which ``_chunk`` calls, is loaded
    first, so that the limit reaches it as well as NumPy's."""
    if _blas[0] != n:
        import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot: SciPy's BLAS)

        threadpool_limits(limits=n, user_api="blas")
        _blas[0] = n


def gradient_partials(
    X, Y, params, sizes, activation: int, head: int, products=np.float64
) -> np.ndarray:
    """The per-chunk partial rows (gradient, loss) of rows X, to be added in chunk order.
    ``products``: the dtype of the GEMMs (float32: float32 products and activations, each
    block's sums added into float64)."""
    n = X.shape[0]
    widths = [int(s) for s in sizes]
    block, per, n_chunks = plan(n, widths, np.dtype(products).itemsize)
    W, b, WT, at = _weights(params, widths, products)
    sizes_a = np.array(widths, dtype=np.int64)
    partial = np.empty((n_chunks, params.size + 1))
    blas_threads(1)
    bufs = _buffers(block, widths, products, numba.get_num_threads()).bufs
    _chunks(X, Y, W, b, WT, sizes_a, at, activation, head, n, per * block, block, bufs, partial)
    return partial

"""The CPU backend's parallel passes over rows: one-layer pipelines and the general MLP.

Rows are cut into blocks and consecutive blocks grouped into chunks; ``prange`` runs over
chunks, and each chunk accumulates its blocks, in order, into its own row of an
(n_chunks, P + 1) float64 scratch, summed afterwards in chunk order (``cpu_layers._combine``).
The split depends only on n and the model, never on the thread count, so results are bitwise
identical for any number of threads and nothing is written by two threads.

One-layer models pipeline blocks: the logits of block b+1 are computed, row-interleaved, with
the gradient of block b, with software prefetch ahead, so memory keeps streaming while the
cached block is reduced.
"""

import numpy as np
from numba import njit, prange

from .cpu_layers import (
    _JIT,
    _accumulate,
    _accumulate_row,
    _backprop,
    _forward_block,
    _head_loss,
    _head_output,
    _layout,
    _store_untransposed,
)
from .native.intrinsics import prefetch_at

PREFETCH_BYTES = 1024  # software prefetch distance ahead of the row being read

_U1, _U2, _U3, _U4 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)


@njit(**_JIT)
def _pipeline_one_output(X, nxt, m_nxt, pT, z_nxt, cur, m_cur, z_cur, gT):
    """k == 1 (linear, logistic): logits of block nxt and gradient of block cur, interleaved.

    Software pipelining keeps memory busy: rows of the next block stream in (prefetched
    PREFETCH_BYTES ahead, one hint per cache line of the four rows, with no clamp at the array's
    end since a prefetch never faults) while the current block, already in L1, is accumulated
    into gT. Rows go four at a time, so w and g are loaded (and g stored) once per four rows.
    Written out in one function on purpose: helpers were slower. Indices are uint64 (constants
    _U*, never a plain int: uint64 + int64 is float64 in Numba): with signed indices Numba emits
    negative-index wraparound selects for every row.
    """
    d = X.shape[1]
    du = np.uint64(d)
    row_bytes = d * X.itemsize
    ahead = max(1, PREFETCH_BYTES // row_bytes)
    mn, mc = np.uint64(m_nxt), np.uint64(m_cur)
    base_n, base_c = np.uint64(nxt), np.uint64(cur)
    top = max(mn, mc)
    i = np.uint64(0)
    while i < top:
        if i + _U4 <= mn:  # logits of four next rows (bias added below)
            ahead_at = (nxt + int(i) + ahead) * row_bytes  # the next four rows' lines, ahead
            for t in range(0, 4 * row_bytes, 64):
                prefetch_at(X, ahead_at + t)
            r = base_n + i
            a0 = a1 = a2 = a3 = 0.0
            j = np.uint64(0)
            while j < du:
                wj = pT[j]
                a0 += X[r, j] * wj
                a1 += X[r + _U1, j] * wj
                a2 += X[r + _U2, j] * wj
                a3 += X[r + _U3, j] * wj
                j += _U1
            z_nxt[i], z_nxt[i + _U1], z_nxt[i + _U2], z_nxt[i + _U3] = a0, a1, a2, a3
        else:
            k = i
            while k < min(i + _U4, mn):
                r = base_n + k
                acc = 0.0
                j = np.uint64(0)
                while j < du:
                    acc += X[r, j] * pT[j]
                    j += _U1
                z_nxt[k] = acc
                k += _U1
        if i + _U4 <= mc:  # gradient of four current rows
            r = base_c + i
            q0, q1, q2, q3 = z_cur[i], z_cur[i + _U1], z_cur[i + _U2], z_cur[i + _U3]
            j = np.uint64(0)
            while j < du:
                gT[j] += q0 * X[r, j] + q1 * X[r + _U1, j] + q2 * X[r + _U2, j] + q3 * X[r + _U3, j]
                j += _U1
        else:
            k = i
            while k < min(i + _U4, mc):
                r = base_c + k
                q = z_cur[k]
                j = np.uint64(0)
                while j < du:
                    gT[j] += q * X[r, j]
                    j += _U1
                k += _U1
        i += _U4
    b = pT[d]
    for i in range(m_nxt):
        z_nxt[i] += b
    gb = 0.0
    for i in range(m_cur):
        gb += z_cur[i]
    gT[d] += gb


@njit(**_JIT)
def _pipeline_many_outputs(X, nxt, m_nxt, pT, k, z_nxt, cur, m_cur, z_cur, gT):
    """k > 1 (softmax, multi-output regression): as above, float64 accumulation throughout."""
    d = X.shape[1]
    for i in range(max(m_nxt, m_cur)):
        if i < m_nxt:
            x = X[nxt + i]
            for o in range(k):
                w = pT[o * d : (o + 1) * d]
                acc = 0.0
                for j in range(d):
                    acc += x[j] * w[j]
                z_nxt[i * k + o] = acc + pT[k * d + o]
        if i < m_cur:
            _accumulate_row(X[cur + i], z_cur[i * k : (i + 1) * k], k, gT, 0)


@njit(parallel=True, **_JIT)
def _single_layer_gradient(X, Y, pT, sizes, head, block, chunk_rows, n_chunks):
    """Fast path for sizes == (d, k): linear, logistic, softmax, multi-output regression.

    Returns the (n_chunks, P + 1) partial sums (gradient in contract layout, then loss).
    """
    n = X.shape[0]
    k = sizes[1]
    P = pT.size
    p_off, _ = _layout(sizes, block)
    partial = np.empty((n_chunks, P + 1))
    for c in prange(n_chunks):
        gT = np.zeros(P)
        z_cur = np.empty(block * k)
        z_nxt = np.empty(block * k)
        loss = 0.0
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        cur, m_cur = start, 0
        for nxt in range(start, stop + block, block):  # one extra turn drains the pipeline
            m_nxt = max(0, min(block, stop - nxt))
            if k == 1:
                _pipeline_one_output(X, nxt, m_nxt, pT, z_nxt, cur, m_cur, z_cur, gT)
            else:
                _pipeline_many_outputs(X, nxt, m_nxt, pT, k, z_nxt, cur, m_cur, z_cur, gT)
            loss += _head_loss(z_nxt, m_nxt, k, Y, nxt, head)  # z_nxt becomes d loss / d z
            z_cur, z_nxt = z_nxt, z_cur
            cur, m_cur = nxt, m_nxt
        _store_untransposed(gT, sizes, p_off, partial[c])
        partial[c, P] = loss
    return partial


@njit(parallel=True, **_JIT)
def _mlp_gradient(X, Y, pT, sizes, activation, head, block, chunk_rows, n_chunks):
    """General dense stack (any number of layers): blocked forward, head, then backward.

    Returns the (n_chunks, P + 1) partial sums (gradient in contract layout, then loss).
    """
    n = X.shape[0]
    n_layers = sizes.size - 1
    P = pT.size
    xf = X.reshape(-1)
    p_off, a_off = _layout(sizes, block)
    width = block * sizes.max()
    partial = np.empty((n_chunks, P + 1))
    for c in prange(n_chunks):
        gT = np.zeros(P)
        acts = np.empty(a_off[n_layers])  # every layer's outputs for the block
        delta = np.empty(width)  # d loss / d (layer input), ping-pong with nxt
        nxt = np.empty(width)
        loss = 0.0
        stop = min(n, (c + 1) * chunk_rows)
        for r0 in range(c * chunk_rows, stop, block):
            m = min(block, stop - r0)
            _forward_block(xf, r0, m, pT, sizes, p_off, a_off, activation, acts)
            k = sizes[n_layers]
            delta[: m * k] = acts[a_off[n_layers - 1] : a_off[n_layers - 1] + m * k]
            loss += _head_loss(delta, m, k, Y, r0, head)
            for layer in range(n_layers - 1, 0, -1):
                src = acts[a_off[layer - 1] :]  # this layer's input = previous layer's output
                w_in, w_out, p0 = sizes[layer], sizes[layer + 1], p_off[layer]
                _accumulate(src, 0, w_in, m, delta, w_out, gT, p0)
                _backprop(delta, w_out, m, pT, p0, w_in, src, activation, nxt)
                delta, nxt = nxt, delta
            _accumulate(xf, r0, sizes[0], m, delta, sizes[1], gT, 0)
        _store_untransposed(gT, sizes, p_off, partial[c])
        partial[c, P] = loss
    return partial


@njit(parallel=True, **_JIT)
def _mlp_forward(X, Y, pT, sizes, activation, head, want_loss, block, chunk_rows, n_chunks, out):
    """Model output into out (n x k), or, if want_loss, the per-chunk loss sums (returned)."""
    n = X.shape[0]
    n_layers = sizes.size - 1
    k = sizes[n_layers]
    xf = X.reshape(-1)
    p_off, a_off = _layout(sizes, block)
    losses = np.zeros(n_chunks)
    for c in prange(n_chunks):
        acts = np.empty(a_off[n_layers])
        stop = min(n, (c + 1) * chunk_rows)
        for r0 in range(c * chunk_rows, stop, block):
            m = min(block, stop - r0)
            _forward_block(xf, r0, m, pT, sizes, p_off, a_off, activation, acts)
            z = acts[a_off[n_layers - 1] :]
            if want_loss:
                losses[c] += _head_loss(z, m, k, Y, r0, head)
            else:
                _head_output(z, m, k, head)
                for i in range(m):
                    for o in range(k):
                        out[r0 + i, o] = z[i * k + o]
    return losses

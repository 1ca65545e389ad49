"""Building blocks of the CPU backend (``cpu``): dense layers, activations, heads, sums.

Each is a loop that LLVM vectorises once inlined into the kernels of ``cpu_passes``: dot products
over the input width, the head or activation over a whole block of rows, axpys for the gradient.
Weights are used transposed (out x in) for that. float32 X is widened as it is read; every
product, sum and accumulator is float64. exp/log/sigmoid/tanh come from ``fastmath``.
"""

import numpy as np
from numba import njit, prange

from . import BINARY, SIGMOID, SOFTMAX, SQUARED, TANH
from .fastmath import fast_exp, fast_log, fast_sigmoid, fast_tanh, log1p_unit

# Reassociation lets LLVM vectorise the dot-product and loss reductions; no nnan/ninf, so a
# diverged model still shows NaN/inf. error_model="numpy": a division must not branch to raise.
_JIT = {"fastmath": {"nsz", "arcp", "contract", "reassoc"}, "error_model": "numpy", "cache": True}


@njit(**_JIT)
def _dense(src, s0, w_in, m, pT, p0, w_out, dst):
    """dst[i, o] = b[o] + sum_j src[s0 + i, j] W[j, o] for m rows (flat, row-major buffers).

    pT holds the layer transposed (w_out x w_in) at p0, then its bias; src may be float32.
    Rows are taken as slices so that inner indices are provably >= 0 (no wraparound selects,
    which would turn the vector loads into gathers).
    """
    b0 = p0 + w_out * w_in
    for i in range(m):
        a = (s0 + i) * w_in
        x = src[a : a + w_in]
        for o in range(w_out):
            w = pT[p0 + o * w_in : p0 + (o + 1) * w_in]
            acc = 0.0
            for j in range(w_in):
                acc += x[j] * w[j]
            dst[i * w_out + o] = acc + pT[b0 + o]


@njit(**_JIT)
def _accumulate_row(x, delta, w_out, gT, p0):
    """gT[p0:] += one row's (dW^T, db): dW^T[o, :] += delta[o] x."""
    w_in = x.size
    b0 = p0 + w_out * w_in
    for o in range(w_out):
        r = delta[o]
        gT[b0 + o] += r
        g = gT[p0 + o * w_in : p0 + (o + 1) * w_in]
        for j in range(w_in):
            g[j] += r * x[j]


@njit(**_JIT)
def _accumulate(src, s0, w_in, m, delta, w_out, gT, p0):
    """gT[p0:] += (dW^T, db) of one layer: dW[j, o] = sum_i src[s0 + i, j] delta[i, o]."""
    for i in range(m):
        a = (s0 + i) * w_in
        _accumulate_row(src[a : a + w_in], delta[i * w_out : (i + 1) * w_out], w_out, gT, p0)


@njit(**_JIT)
def _activate(buf, count, activation):
    """Apply the hidden activation in place to buf[:count]."""
    if activation == SIGMOID:
        for i in range(count):
            buf[i] = fast_sigmoid(buf[i])
    elif activation == TANH:
        for i in range(count):
            buf[i] = fast_tanh(buf[i])
    else:
        for i in range(count):
            buf[i] = max(buf[i], 0.0)


@njit(**_JIT)
def _backprop(delta, w_out, m, pT, p0, w_in, act, activation, out):
    """out[i, j] = (sum_o delta[i, o] W[j, o]) * act'(.) with act' taken from the outputs act."""
    for i in range(m):
        row = out[i * w_in : (i + 1) * w_in]
        row[:] = 0.0
        for o in range(w_out):
            r = delta[i * w_out + o]
            w = pT[p0 + o * w_in : p0 + (o + 1) * w_in]
            for j in range(w_in):
                row[j] += r * w[j]
    count = m * w_in
    if activation == SIGMOID:
        for t in range(count):
            out[t] *= act[t] * (1.0 - act[t])
    elif activation == TANH:
        for t in range(count):
            out[t] *= 1.0 - act[t] * act[t]
    else:
        for t in range(count):
            out[t] = out[t] if act[t] > 0.0 else 0.0


@njit(**_JIT)
def _softmax_row(z):
    """Softmax of one row of logits in place; returns its log-sum-exp (max subtracted first)."""
    mx = z[0]
    for o in range(1, z.size):
        mx = max(mx, z[o])
    s = 0.0
    for o in range(z.size):
        z[o] = fast_exp(z[o] - mx)
        s += z[o]
    inv = 1.0 / s
    for o in range(z.size):
        z[o] *= inv
    return mx + fast_log(s)


@njit(**_JIT)
def _head_loss(z, m, k, Y, r0, head):
    """Sum of the m rows' losses; z (m x k logits) is overwritten by d loss / d z.

    Labels outside 0..k-1 (SOFTMAX) give a NaN loss instead of reading out of bounds.
    """
    loss = 0.0
    cols = k if head == SQUARED else 1
    # A flat slice: unit stride and indices provably >= 0, so the loads below vectorise.
    y = Y.reshape(-1)[r0 * cols : (r0 + m) * cols]
    if head == SQUARED and k == 1:
        for i in range(m):
            r = z[i] - y[i]
            loss += r * r
            z[i] = 2.0 * r
    elif head == SQUARED:
        for i in range(m):
            for o in range(k):
                r = z[i * k + o] - y[i * k + o]
                loss += r * r
                z[i * k + o] = 2.0 * r
    elif head == BINARY:  # log(1 + e^z) - y z, stable; d/dz = sigmoid(z) - y
        for i in range(m):
            v = z[i]
            t = y[i]
            e = fast_exp(-abs(v))
            loss += max(v, 0.0) - t * v + log1p_unit(e)
            inv = 1.0 / (1.0 + e)
            z[i] = (inv if v >= 0.0 else e * inv) - t
    else:  # SOFTMAX: log-sum-exp after subtracting the row max; d/dz = p - onehot(y)
        for i in range(m):
            row = z[i * k : (i + 1) * k]
            cls = int(y[i])
            valid = 0 <= cls < k
            zy = row[cls] if valid else np.nan
            loss += _softmax_row(row) - zy
            if valid:
                row[cls] -= 1.0
    return loss


@njit(**_JIT)
def _head_output(z, m, k, head):
    """Turn m x k logits into the model output in place: value, P(class 1) or probabilities."""
    if head == BINARY:
        for i in range(m):
            z[i] = fast_sigmoid(z[i])
    elif head == SOFTMAX:
        for i in range(m):
            _softmax_row(z[i * k : (i + 1) * k])


@njit(**_JIT)
def _layout(sizes, block):
    """Offsets of each layer in the flat parameters, and of each layer's block output buffer."""
    n_layers = sizes.size - 1
    p_off = np.zeros(n_layers + 1, np.int64)
    a_off = np.zeros(n_layers + 1, np.int64)
    for layer in range(n_layers):
        p_off[layer + 1] = p_off[layer] + (sizes[layer] + 1) * sizes[layer + 1]
        a_off[layer + 1] = a_off[layer] + block * sizes[layer + 1]
    return p_off, a_off


@njit(**_JIT)
def _forward_block(xf, r0, m, pT, sizes, p_off, a_off, activation, acts):
    """Forward pass of rows r0..r0+m; layer l's output goes to acts[a_off[l]:]; last is logits."""
    n_layers = sizes.size - 1
    _dense(xf, r0, sizes[0], m, pT, 0, sizes[1], acts[a_off[0] :])
    for layer in range(1, n_layers):
        _activate(acts[a_off[layer - 1] :], m * sizes[layer], activation)
        src = acts[a_off[layer - 1] :]
        _dense(src, 0, sizes[layer], m, pT, p_off[layer], sizes[layer + 1], acts[a_off[layer] :])


@njit(**_JIT)
def _store_untransposed(gT, sizes, p_off, row):
    """row[:P] = gT with each layer's W^T (out x in) written back as W (in x out), row-major."""
    for layer in range(sizes.size - 1):
        w_in, w_out, p0 = sizes[layer], sizes[layer + 1], p_off[layer]
        for j in range(w_in):
            for o in range(w_out):
                row[p0 + j * w_out + o] = gT[p0 + o * w_in + j]
        for o in range(w_out):
            row[p0 + w_in * w_out + o] = gT[p0 + w_in * w_out + o]


_COMBINE_TILE = 256


@njit(nogil=True, **_JIT)
def _combine_columns(partial, out, lo, hi):
    """out[j] = sum over chunks c (in order) of partial[c, j], for columns lo..hi.

    On views from column lo, indexed from 0: LLVM vectorises these loops (indexed from lo, it
    kept them scalar: 31 against 7.6 us for two rows of 18,562 columns), the same sums."""
    o = out[lo:hi]
    for j in range(hi - lo):
        o[j] = 0.0
    for c in range(partial.shape[0]):
        row = partial[c, lo:hi]
        for j in range(hi - lo):
            o[j] += row[j]


@njit(parallel=True, **_JIT)
def _combine(partial, out):
    """``_combine_columns`` over tiles of columns in parallel: fixed order, so deterministic."""
    width = partial.shape[1]
    tile = _COMBINE_TILE
    for t in prange((width + tile - 1) // tile):
        _combine_columns(partial, out, t * tile, min(width, (t + 1) * tile))

"""CPU backend of the dense-stack contract in ``lepton_hpc.kernels`` (Numba, multithreaded).

Layout of the work: rows are cut into blocks (a few hundred rows, sized to stay in L1/L2), and
blocks are grouped into chunks; ``prange`` runs over chunks and each chunk accumulates its blocks,
in order, into its own row of a (n_chunks, P + 1) float64 scratch. The chunk rows are then summed
column by column in chunk order. The split depends only on n and the model, never on the thread
count, so a result is bitwise the same for 1 or 16 threads. There are no shared writes (no races).

Precision: float32 X is widened to float64 element by element as it is read; every product, sum
and accumulator is float64. exp/log come from ``fastmath`` (vectorisable, relative error < 1e-13).

Inside a block each step is a loop that LLVM vectorises: (1) affine map z = x W + b as dot
products over the input width, (2) the activation or head on the whole block of z at once, (3)
the gradient as axpys over the input width. Weights are used transposed (out x in) for that.
"""

import numpy as np
from numba import njit, prange

from . import BINARY, RELU, SIGMOID, SOFTMAX, SQUARED, TANH, param_count
from .fastmath import fast_exp, fast_log, fast_sigmoid, fast_tanh, log1p_unit, prefetch_row

# Reassociation lets LLVM vectorise the dot-product and loss reductions; no nnan/ninf, so a
# diverged model still shows NaN/inf. error_model="numpy": a division must not branch to raise.
_JIT = {"fastmath": {"nsz", "arcp", "contract", "reassoc"}, "error_model": "numpy", "cache": True}

SINGLE_BLOCK = 256  # rows per block, one-layer models: 256 x 32 float32 = 32 KiB, L1-resident
PREFETCH_ROWS = 32  # software prefetch distance in the one-output pipeline (measured best)
MLP_ROW_FLOATS = 16384  # MLP blocks: rows x (sum of layer widths) <= this (128 KiB of float64)
MAX_CHUNKS = 1024  # enough chunks to balance any thread count we run with
SCRATCH_BYTES = 64 << 20  # cap on the per-chunk partial sums for very large models


# ---------------------------------------------------------------------------------- building blocks


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
def _pipeline_one_output(X, nxt, m_nxt, pT, z_nxt, cur, m_cur, z_cur, gT):
    """k == 1 (linear, logistic): logits of block nxt and gradient of block cur, row-interleaved.

    Software pipelining keeps memory busy: rows of the next block stream in (prefetched a few
    rows ahead) while the current block, already in L1, is accumulated into float64 gT.
    """
    d = X.shape[1]
    w, b = pT[:d], pT[d]
    g = gT[:d]
    last = X.shape[0] - 1
    gb = 0.0
    for i in range(max(m_nxt, m_cur)):
        if i < m_nxt:
            prefetch_row(X, min(nxt + i + PREFETCH_ROWS, last))
            x = X[nxt + i]
            acc = 0.0
            for j in range(d):
                acc += x[j] * w[j]
            z_nxt[i] = acc + b
        if i < m_cur:
            x = X[cur + i]
            r = z_cur[i]
            gb += r
            for j in range(d):
                g[j] += r * x[j]
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
            a = i * k
            mx = z[a]
            for o in range(1, k):
                mx = max(mx, z[a + o])
            cls = int(y[i])
            zy = z[a + cls] if 0 <= cls < k else np.nan
            s = 0.0
            for o in range(k):
                e = fast_exp(z[a + o] - mx)
                z[a + o] = e
                s += e
            loss += mx + fast_log(s) - zy
            inv = 1.0 / s
            for o in range(k):
                z[a + o] = z[a + o] * inv - (1.0 if o == cls else 0.0)
    return loss


@njit(**_JIT)
def _head_output(z, m, k, head):
    """Turn m x k logits into the model output in place: value, P(class 1) or probabilities."""
    if head == BINARY:
        for i in range(m):
            z[i] = fast_sigmoid(z[i])
    elif head == SOFTMAX:
        for i in range(m):
            a = i * k
            mx = z[a]
            for o in range(1, k):
                mx = max(mx, z[a + o])
            s = 0.0
            for o in range(k):
                e = fast_exp(z[a + o] - mx)
                z[a + o] = e
                s += e
            inv = 1.0 / s
            for o in range(k):
                z[a + o] *= inv


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


# ---------------------------------------------------------------------------------------- kernels


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


@njit(parallel=True, **_JIT)
def _combine(partial, out):
    """out[j] = sum over chunks c (in order) of partial[c, j]: fixed order, so deterministic."""
    n_chunks, width = partial.shape
    tile = 256
    for t in prange((width + tile - 1) // tile):
        lo, hi = t * tile, min(width, (t + 1) * tile)
        for j in range(lo, hi):
            out[j] = 0.0
        for c in range(n_chunks):
            for j in range(lo, hi):
                out[j] += partial[c, j]


# ------------------------------------------------------------------------------ Python dispatch


def _plan(n: int, block: int, width: int) -> tuple[int, int]:
    """(n_chunks, rows per chunk): whole blocks per chunk, from n and the model only."""
    n_blocks = -(-n // block)
    cap = max(1, min(MAX_CHUNKS, SCRATCH_BYTES // (8 * width)))
    per = max(1, -(-n_blocks // cap))
    return -(-n_blocks // per), per * block


def _mlp_block(sizes: np.ndarray) -> int:
    """Rows per MLP block so that the block's activations stay around 128 KiB."""
    return int(np.clip(MLP_ROW_FLOATS // int(sizes[1:].sum()), 8, 512))


def _transposed(params: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Copy of params with every W (in x out) stored as W^T (out x in); biases unchanged."""
    pT = np.empty_like(params)
    p0 = 0
    for w_in, w_out in zip(sizes[:-1].tolist(), sizes[1:].tolist(), strict=True):
        nw = w_in * w_out
        pT[p0 : p0 + nw] = params[p0 : p0 + nw].reshape(w_in, w_out).T.ravel()
        pT[p0 + nw : p0 + nw + w_out] = params[p0 + nw : p0 + nw + w_out]
        p0 += nw + w_out
    return pT


def _prepare(X, params, sizes, activation, head):
    """Validate shapes and codes; return contiguous X (float32/64), params, int64 sizes."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    X = np.ascontiguousarray(X)
    params = np.ascontiguousarray(params, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size < 2 or np.any(sizes < 1):
        raise ValueError(f"sizes must be >= 2 positive widths, got {sizes}")
    if X.ndim != 2 or X.shape[1] != sizes[0]:
        raise ValueError(f"X must be (n, {sizes[0]}), got {X.shape}")
    if params.shape != (param_count(sizes),):
        raise ValueError(f"params must have length {param_count(sizes)}, got {params.shape}")
    if head not in (SQUARED, BINARY, SOFTMAX) or activation not in (SIGMOID, TANH, RELU):
        raise ValueError(f"unknown head {head} or activation {activation}")
    if head == BINARY and sizes[-1] != 1:
        raise ValueError("the BINARY head needs one output")
    return X, params, sizes


def _targets(y, n: int, k: int, head: int) -> np.ndarray:
    """y as a C-contiguous (n, k) array for SQUARED, (n, 1) for labels; float32/64 kept as is."""
    y = np.asarray(y)
    if y.dtype not in (np.float32, np.float64):
        y = y.astype(np.float64)
    cols = k if head == SQUARED else 1
    if y.size != n * cols or (y.ndim == 2 and y.shape != (n, cols)) or y.ndim > 2:
        raise ValueError(f"y must have {n} rows of {cols} target(s), got shape {y.shape}")
    return np.ascontiguousarray(y).reshape(n, cols)


def gradient(X, y, params, sizes, activation: int, head: int, out: np.ndarray) -> None:
    """out[:P] = sum of per-row loss gradients, out[P] = sum of losses, out[P+1] = n."""
    X, params, sizes = _prepare(X, params, sizes, activation, head)
    P, n = params.size, X.shape[0]
    if out.shape != (P + 2,) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of length {P + 2}")
    if n == 0:
        out[:] = 0.0
        return
    Y = _targets(y, n, int(sizes[-1]), head)
    pT = _transposed(params, sizes)
    if sizes.size == 2:
        n_chunks, rows = _plan(n, SINGLE_BLOCK, P + 1)
        partial = _single_layer_gradient(X, Y, pT, sizes, head, SINGLE_BLOCK, rows, n_chunks)
    else:
        block = _mlp_block(sizes)
        n_chunks, rows = _plan(n, block, P + 1)
        partial = _mlp_gradient(X, Y, pT, sizes, activation, head, block, rows, n_chunks)
    _combine(partial, out[: P + 1])
    out[P + 1] = n


def _run_forward(X, Y, params, sizes, activation, head, out):
    """Shared driver of forward() and loss_sum(); returns the per-chunk losses."""
    n = X.shape[0]
    block = SINGLE_BLOCK if sizes.size == 2 else _mlp_block(sizes)
    n_chunks, rows = _plan(n, block, 1)
    pT = _transposed(params, sizes)
    want_loss = out.shape[0] == 0
    return _mlp_forward(X, Y, pT, sizes, activation, head, want_loss, block, rows, n_chunks, out)


def forward(X, params, sizes, activation: int, head: int, out: np.ndarray) -> None:
    """out (n, k) float64 = model output: value, P(class 1), or class probabilities."""
    X, params, sizes = _prepare(X, params, sizes, activation, head)
    n, k = X.shape[0], int(sizes[-1])
    if out.shape != (n, k) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of shape ({n}, {k})")
    if n == 0:
        return
    _run_forward(X, np.empty((0, 1)), params, sizes, activation, head, out)


def loss_sum(X, y, params, sizes, activation: int, head: int) -> float:
    """Sum over rows of the loss (forward pass only; for line searches and finite differences)."""
    X, params, sizes = _prepare(X, params, sizes, activation, head)
    n = X.shape[0]
    if n == 0:
        return 0.0
    Y = _targets(y, n, int(sizes[-1]), head).astype(np.float64, copy=False)
    losses = _run_forward(X, Y, params, sizes, activation, head, np.empty((0, int(sizes[-1]))))
    return float(losses.sum())

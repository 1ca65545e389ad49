"""CPU backend of the dense-stack contract in ``lepton_hpc.kernels`` (Numba, multithreaded).

Work split: rows are cut into blocks (about 8 KiB of X for one-layer models, about 128 KiB of
activations for MLPs) and consecutive blocks are grouped into chunks; ``prange`` runs over
chunks, and each chunk accumulates its blocks, in order, into its own row of an
(n_chunks, P + 1) float64 scratch. Those rows are then summed column by column in chunk order.
The split depends only on n and the model, never on the thread count, so results are bitwise
identical for any number of threads, and nothing is written by two threads (no races).

Precision: float32 X is widened to float64 as it is read; every product, sum and accumulator
is float64 (so the float32 and float64 paths agree with a float64 reference to ~1e-13, and
row-split sums are additive to rounding). exp/log/sigmoid/tanh come from ``fastmath``:
vectorisable arithmetic versions, relative error < 5e-14.

Speed: each step inside a block is a loop that LLVM vectorises (dot products over the input
width, the head or activation over the whole block, axpys for the gradient); weights are used
transposed (out x in) for that. One-output models (linear, logistic) with up to 32 features
run ``_one_output_tiles`` where the CPU has AVX-512: explicit SIMD vectors (``simd``) hold
four rows in registers from their load through their dot products, the head (on the four
logits at once) and their gradient, so each value is loaded and widened once and the gradient
never leaves registers within a chunk (5.4 against 9.5 ns per row in cache, linear). The
logistic head runs ``_one_output_tiles8``, the same in groups of eight rows, so its head runs
on eight logits at once (7.6 against 8.8 ns per row in cache). Wider
one-output models, and CPUs without AVX-512, pipeline blocks instead: the logits of block b+1
are computed, row-interleaved, with the gradient of block b, with software prefetch ahead, so
memory keeps streaming while the cached block is reduced.
"""

import llvmlite.binding as llvm
import numpy as np
from numba import config, njit, prange

from . import BINARY, RELU, SIGMOID, SOFTMAX, SQUARED, TANH, param_count
from .fastmath import (
    fast_exp,
    fast_log,
    fast_sigmoid,
    fast_tanh,
    log1p_unit,
    prefetch_at,
)
from .simd import (
    fma,
    head_lanes,
    hsum,
    hsum4,
    hsum8,
    lane8,
    load4,
    load8,
    splat4,
    splat8,
    store8,
    zero4,
    zero8,
)

# Reassociation lets LLVM vectorise the dot-product and loss reductions; no nnan/ninf, so a
# diverged model still shows NaN/inf. error_model="numpy": a division must not branch to raise.
_JIT = {"fastmath": {"nsz", "arcp", "contract", "reassoc"}, "error_model": "numpy", "cache": True}

SINGLE_BLOCK_BYTES = 4096  # one-layer models: rows of X per block (measured best: 4 KiB)
PREFETCH_BYTES = 1024  # software prefetch distance ahead of the row being read (measured)
MLP_ROW_FLOATS = 16384  # MLP blocks: rows x (sum of layer widths) <= this (128 KiB of float64)
MAX_CHUNKS = 1024  # enough chunks to balance any thread count we run with
SCRATCH_BYTES = 64 << 20  # fewer chunks for big models, to bound the per-chunk partial sums...
MIN_CHUNKS = 16  # ...but never fewer than this (when there are enough blocks)
MIN_CHUNK_BLOCKS = 8  # a chunk has at least this many blocks: small batches pay less per chunk
TILE_WIDTH = 32  # one-output models up to this many features: rows held in registers (simd)
TILE_AHEAD_BYTES = 2048  # software prefetch distance of that kernel (measured: 1-4 KiB)


def _host_has_avx512() -> bool:
    """Whether Numba compiles for this host, and it has AVX-512 (32 registers of 8 float64)."""
    if config.CPU_NAME not in (None, "host"):
        return False
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


# The register-tile kernel for one-output models needs AVX-512's 32 zmm registers: elsewhere
# its 24 live vectors spill and the pipelined kernel below is faster. Tests switch it.
USE_TILES = _host_has_avx512()


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


_U1, _U2, _U3, _U4 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)


@njit(**_JIT)
def _pipeline_one_output(X, nxt, m_nxt, pT, z_nxt, cur, m_cur, z_cur, gT):
    """k == 1 (linear, logistic): logits of block nxt and gradient of block cur, interleaved.

    Software pipelining keeps memory busy: rows of the next block stream in (prefetched
    PREFETCH_BYTES ahead, one hint per cache line of the four rows, with no clamp at the array's
    end since a prefetch never faults: 7 % faster on 4M rows than a clamped hint for the first
    and last line of each row) while the current block, already in L1, is accumulated into gT.
    Rows go four at a time, so w and g are loaded (and g stored) once per four rows. Written
    out in one function on purpose: splitting it into helpers measured 1.6x slower. Indices
    are uint64 (constants _U*, never a plain int: uint64 + int64 is float64 in Numba): with
    signed indices Numba emits negative-index wraparound selects for every row, about 25% of
    the instructions of these loops (measured in cache: 9.9 -> 8.0 ns per row, linear).
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


@njit(inline="always", error_model="numpy")
def _row_tiles(flat, o, count):
    """flat[o : o + count] (count <= 32) as four vec8 of 8 values each, widened; the rest 0."""
    return (
        load8(flat, o, count),
        load8(flat, o + 8, count - 8),
        load8(flat, o + 16, count - 16),
        load8(flat, o + 24, count - 24),
    )


@njit(inline="always")
def _dot_tiles(x0, x1, x2, x3, w0, w1, w2, w3):
    """The lanes of x . w for a row held as four vec8 (summed across lanes by hsum4/hsum8)."""
    return fma(x3, w3, fma(x2, w2, fma(x1, w1, x0 * w0)))


@njit(inline="always")
def _add_rows(g, s0, s1, s2, s3, x0, x1, x2, x3):
    """g + s0 x0 + s1 x1 + s2 x2 + s3 x3 (one vec8 of four rows' features), FMAs in that order."""
    return fma(x3, s3, fma(x2, s2, fma(x1, s1, fma(x0, s0, g))))


@njit(inline="always", error_model="numpy")
def _tile_group(xf, o, d, live, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3):
    """Logits, head and gradient of rows i .. i + live - 1 (live <= 4) of a model with d <= 32.

    The rows are loaded and widened once into 16 vec8 registers (row r, features 8t .. 8t + 7);
    lanes past d, and rows past live, read as 0 and touch no memory. Returns the updated
    gradient registers and the head's (d loss / d z, loss) vec4.
    """
    c0 = d if live > 0 else 0
    c1 = d if live > 1 else 0
    c2 = d if live > 2 else 0
    c3 = d if live > 3 else 0
    x00, x01, x02, x03 = _row_tiles(xf, o, c0)
    x10, x11, x12, x13 = _row_tiles(xf, o + d, c1)
    x20, x21, x22, x23 = _row_tiles(xf, o + 2 * d, c2)
    x30, x31, x32, x33 = _row_tiles(xf, o + 3 * d, c3)
    z = (
        hsum4(
            _dot_tiles(x00, x01, x02, x03, w0, w1, w2, w3),
            _dot_tiles(x10, x11, x12, x13, w0, w1, w2, w3),
            _dot_tiles(x20, x21, x22, x23, w0, w1, w2, w3),
            _dot_tiles(x30, x31, x32, x33, w0, w1, w2, w3),
        )
        + bias
    )
    y = load4(yf, i, live)
    if binary:
        q, loss = head_lanes(z, y, live, True)
    else:
        q, loss = head_lanes(z, y, live, False)
    s0, s1, s2, s3 = lane8(q, 0), lane8(q, 1), lane8(q, 2), lane8(q, 3)
    g0 = _add_rows(g0, s0, s1, s2, s3, x00, x10, x20, x30)
    g1 = _add_rows(g1, s0, s1, s2, s3, x01, x11, x21, x31)
    g2 = _add_rows(g2, s0, s1, s2, s3, x02, x12, x22, x32)
    g3 = _add_rows(g3, s0, s1, s2, s3, x03, x13, x23, x33)
    return g0, g1, g2, g3, q, loss


@njit(inline="always", error_model="numpy")
def _tile_group8(xf, o, d, live, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3):
    """_tile_group for eight rows (live <= 8), with the head on the eight logits as one vec8.

    32 registers of rows do not fit beside the weights and the gradient, so the compiler
    spills some rows to the stack after their dot products and the gradient's FMAs read them
    back from L1 (a load, not a second widening). For the logistic head that pays: the head
    runs once per eight rows instead of once per four (in cache 7.6 against 8.8 ns per row,
    one thread; from memory 0.74-0.76 of the read ceiling against 0.69-0.72). For the squared
    head, which is cheap, the spills cost more than they save: it keeps the four-row groups.
    """
    x00, x01, x02, x03 = _row_tiles(xf, o + 0 * d, d if live > 0 else 0)
    z0 = _dot_tiles(x00, x01, x02, x03, w0, w1, w2, w3)
    x10, x11, x12, x13 = _row_tiles(xf, o + 1 * d, d if live > 1 else 0)
    z1 = _dot_tiles(x10, x11, x12, x13, w0, w1, w2, w3)
    x20, x21, x22, x23 = _row_tiles(xf, o + 2 * d, d if live > 2 else 0)
    z2 = _dot_tiles(x20, x21, x22, x23, w0, w1, w2, w3)
    x30, x31, x32, x33 = _row_tiles(xf, o + 3 * d, d if live > 3 else 0)
    z3 = _dot_tiles(x30, x31, x32, x33, w0, w1, w2, w3)
    x40, x41, x42, x43 = _row_tiles(xf, o + 4 * d, d if live > 4 else 0)
    z4 = _dot_tiles(x40, x41, x42, x43, w0, w1, w2, w3)
    x50, x51, x52, x53 = _row_tiles(xf, o + 5 * d, d if live > 5 else 0)
    z5 = _dot_tiles(x50, x51, x52, x53, w0, w1, w2, w3)
    x60, x61, x62, x63 = _row_tiles(xf, o + 6 * d, d if live > 6 else 0)
    z6 = _dot_tiles(x60, x61, x62, x63, w0, w1, w2, w3)
    x70, x71, x72, x73 = _row_tiles(xf, o + 7 * d, d if live > 7 else 0)
    z7 = _dot_tiles(x70, x71, x72, x73, w0, w1, w2, w3)
    z = hsum8(z0, z1, z2, z3, z4, z5, z6, z7) + bias
    y = load8(yf, i, live)
    if binary:
        q, loss = head_lanes(z, y, live, True)
    else:
        q, loss = head_lanes(z, y, live, False)
    s0, s1, s2, s3 = lane8(q, 0), lane8(q, 1), lane8(q, 2), lane8(q, 3)
    s4, s5, s6, s7 = lane8(q, 4), lane8(q, 5), lane8(q, 6), lane8(q, 7)
    g0 = _add_rows(g0, s0, s1, s2, s3, x00, x10, x20, x30)
    g0 = _add_rows(g0, s4, s5, s6, s7, x40, x50, x60, x70)
    g1 = _add_rows(g1, s0, s1, s2, s3, x01, x11, x21, x31)
    g1 = _add_rows(g1, s4, s5, s6, s7, x41, x51, x61, x71)
    g2 = _add_rows(g2, s0, s1, s2, s3, x02, x12, x22, x32)
    g2 = _add_rows(g2, s4, s5, s6, s7, x42, x52, x62, x72)
    g3 = _add_rows(g3, s0, s1, s2, s3, x03, x13, x23, x33)
    g3 = _add_rows(g3, s4, s5, s6, s7, x43, x53, x63, x73)
    return g0, g1, g2, g3, q, loss


@njit(parallel=True, error_model="numpy", cache=True)
def _one_output_tiles(X, Y, w, binary, ahead, chunk_rows, n_chunks):
    """k == 1 and d <= TILE_WIDTH (linear, logistic): one pass, rows and gradient in registers.

    Per group of four rows: one load of the rows (widened to float64), four dot products reduced
    together (hsum4), the head on the four logits as one vector, and 16 FMAs into the gradient,
    which stays in four registers for the whole chunk. Returns the (n_chunks, d + 2) partial
    sums: gradient, bias gradient, loss. Chunks are as in _single_layer_gradient (whole blocks,
    from n and the model only), so results do not depend on the thread count.

    No fast-math flags here: every fused multiply-add is an explicit fma, so the rounding is
    fixed by the code. With _JIT's flags, Numba gave this parallel function fast-math when it
    compiled it and not when it loaded it from its cache (or the other way round), and the two
    differed in the last bit (tests/unit/test_kernels_cpu.py checks a cached against a fresh
    compile).
    """
    n, d = X.shape
    xf = X.reshape(-1)
    yf = Y.reshape(-1)
    row_bytes = d * X.itemsize
    partial = np.empty((n_chunks, d + 2))
    w0, w1, w2, w3 = _row_tiles(w, 0, d)
    bias = splat4(w[d])
    for c in prange(n_chunks):
        g0, g1, g2, g3 = zero8(), zero8(), zero8(), zero8()
        q_sum, loss_sum = zero4(), zero4()
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for i in range(start, stop, 4):
            live = min(4, stop - i)
            at = (i + ahead) * row_bytes
            for t in range(0, 4 * row_bytes, 64):
                prefetch_at(X, at + t)
            if live == 4:  # the common case, with its masks known to be the full rows
                g0, g1, g2, g3, q, loss = _tile_group(
                    xf, i * d, d, 4, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3
                )
            else:
                g0, g1, g2, g3, q, loss = _tile_group(
                    xf, i * d, d, live, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3
                )
            q_sum = q_sum + q
            loss_sum = loss_sum + loss
        _store_partial(partial[c], d, g0, g1, g2, g3, hsum(q_sum), hsum(loss_sum))
    return partial


@njit(parallel=True, error_model="numpy", cache=True)
def _one_output_tiles8(X, Y, w, binary, ahead, chunk_rows, n_chunks):
    """_one_output_tiles in groups of eight rows (_tile_group8); used for the logistic head.

    Same chunks and contract (either head); the sums agree with _one_output_tiles to rounding,
    not bitwise (another order of the FMAs). A kernel of its own: with both group
    sizes in one function the register allocation of each got worse (same-process A/B on
    4M x 32 float32 rows, 2 threads: 19.5-20.9 against 18.8-18.9 ms). No fast-math flags, for
    the reason given there.
    """
    n, d = X.shape
    xf = X.reshape(-1)
    yf = Y.reshape(-1)
    row_bytes = d * X.itemsize
    partial = np.empty((n_chunks, d + 2))
    w0, w1, w2, w3 = _row_tiles(w, 0, d)
    bias = splat8(w[d])
    for c in prange(n_chunks):
        g0, g1, g2, g3 = zero8(), zero8(), zero8(), zero8()
        q_sum, loss_sum = zero8(), zero8()
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for i in range(start, stop, 8):
            live = min(8, stop - i)
            at = (i + ahead) * row_bytes
            for t in range(0, 8 * row_bytes, 64):
                prefetch_at(X, at + t)
            if live == 8:  # the common case, with its masks known to be the full rows
                g0, g1, g2, g3, q, loss = _tile_group8(
                    xf, i * d, d, 8, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3
                )
            else:
                g0, g1, g2, g3, q, loss = _tile_group8(
                    xf, i * d, d, live, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3
                )
            q_sum = q_sum + q
            loss_sum = loss_sum + loss
        _store_partial(partial[c], d, g0, g1, g2, g3, hsum(q_sum), hsum(loss_sum))
    return partial


@njit(inline="always")
def _store_partial(row, d, g0, g1, g2, g3, q_sum, loss_sum):
    """A chunk's partial sums: gradient (d values from four vec8), bias gradient, loss."""
    store8(row, 0, d, g0)
    store8(row, 8, d - 8, g1)
    store8(row, 16, d - 16, g2)
    store8(row, 24, d - 24, g3)
    row[d] = q_sum
    row[d + 1] = loss_sum


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


_COMBINE_TILE = 256


@njit(**_JIT)
def _combine_columns(partial, out, lo, hi):
    """out[j] = sum over chunks c (in order) of partial[c, j], for columns lo..hi."""
    for j in range(lo, hi):
        out[j] = 0.0
    for c in range(partial.shape[0]):
        for j in range(lo, hi):
            out[j] += partial[c, j]


@njit(parallel=True, **_JIT)
def _combine(partial, out):
    """``_combine_columns`` over tiles of columns in parallel: fixed order, so deterministic."""
    width = partial.shape[1]
    tile = _COMBINE_TILE
    for t in prange((width + tile - 1) // tile):
        _combine_columns(partial, out, t * tile, min(width, (t + 1) * tile))


# ------------------------------------------------------------------------------ Python dispatch


def _plan(n: int, block: int, width: int) -> tuple[int, int]:
    """(n_chunks, rows per chunk): whole blocks per chunk, from n and the model only."""
    n_blocks = -(-n // block)
    cap = max(MIN_CHUNKS, min(MAX_CHUNKS, SCRATCH_BYTES // (8 * width)))
    per = max(min(MIN_CHUNK_BLOCKS, n_blocks), -(-n_blocks // cap))
    return -(-n_blocks // per), per * block


def _single_block(X: np.ndarray) -> int:
    """Rows per one-layer block: about SINGLE_BLOCK_BYTES of X, a multiple of 4 rows."""
    rows = SINGLE_BLOCK_BYTES // max(1, X.shape[1] * X.itemsize)
    return min(max(rows, 8), 512) // 4 * 4


def _mlp_block(sizes: np.ndarray) -> int:
    """Rows per MLP block so that the block's activations stay around 128 KiB."""
    return min(max(MLP_ROW_FLOATS // int(sizes[1:].sum()), 8), 512)


def _transposed(params: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """params with every W (in x out) stored as W^T (out x in); biases unchanged.

    One output layer (linear, logistic): W^T has the same layout as W, params is returned as is.
    """
    if sizes.size == 2 and sizes[1] == 1:
        return params
    pT = np.empty_like(params)
    p0 = 0
    for w_in, w_out in zip(sizes[:-1].tolist(), sizes[1:].tolist(), strict=True):
        nw = w_in * w_out
        pT[p0 : p0 + nw] = params[p0 : p0 + nw].reshape(w_in, w_out).T.ravel()
        pT[p0 + nw : p0 + nw + w_out] = params[p0 + nw : p0 + nw + w_out]
        p0 += nw + w_out
    return pT


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _prepare(X, params, sizes, activation, head):
    """Validate shapes and codes; return contiguous X (float32/64), params, int64 sizes.

    Arrays that already have the right dtype and layout pass through without a copy (this runs
    once per training step, so it is kept to a few microseconds).
    """
    if not (isinstance(sizes, np.ndarray) and sizes.dtype == np.int64 and sizes.flags.c_contiguous):
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if not isinstance(X, np.ndarray) or X.dtype not in _FLOATS or not X.flags.c_contiguous:
        X = np.asarray(X)
        X = np.ascontiguousarray(X if X.dtype in _FLOATS else X.astype(np.float64))
    if not (
        isinstance(params, np.ndarray) and params.dtype == np.float64 and params.flags.c_contiguous
    ):
        params = np.ascontiguousarray(params, dtype=np.float64)
    widths = sizes.tolist()
    if sizes.ndim != 1 or len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"sizes must be >= 2 positive widths, got {sizes}")
    if X.ndim != 2 or X.shape[1] != widths[0]:
        raise ValueError(f"X must be (n, {widths[0]}), got {X.shape}")
    if params.shape != (param_count(widths),):
        raise ValueError(f"params must have length {param_count(widths)}, got {params.shape}")
    if head not in (SQUARED, BINARY, SOFTMAX) or activation not in (SIGMOID, TANH, RELU):
        raise ValueError(f"unknown head {head} or activation {activation}")
    if head == BINARY and widths[-1] != 1:
        raise ValueError("the BINARY head needs one output")
    return X, params, sizes


def _targets(y, n: int, k: int, head: int) -> np.ndarray:
    """y as a C-contiguous (n, k) array for SQUARED, (n, 1) for labels; float32/64 kept as is."""
    if not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if y.dtype not in _FLOATS:
        y = y.astype(np.float64)
    cols = k if head == SQUARED else 1
    if y.size != n * cols or (y.ndim == 2 and y.shape != (n, cols)) or y.ndim > 2:
        raise ValueError(f"y must have {n} rows of {cols} target(s), got shape {y.shape}")
    if not y.flags.c_contiguous:
        y = np.ascontiguousarray(y)
    return y.reshape(n, cols)


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
    if USE_TILES and sizes.size == 2 and sizes[1] == 1 and X.shape[1] <= TILE_WIDTH:
        n_chunks, rows = _plan(n, _single_block(X), P + 1)
        ahead = max(1, TILE_AHEAD_BYTES // (X.shape[1] * X.itemsize))
        # The logistic head pays for eight-row groups, the cheap squared head does not.
        tiles = _one_output_tiles8 if head == BINARY else _one_output_tiles
        partial = tiles(X, Y, pT, head == BINARY, ahead, rows, n_chunks)
    elif sizes.size == 2:
        block = _single_block(X)
        n_chunks, rows = _plan(n, block, P + 1)
        partial = _single_layer_gradient(X, Y, pT, sizes, head, block, rows, n_chunks)
    else:
        block = _mlp_block(sizes)
        n_chunks, rows = _plan(n, block, P + 1)
        partial = _mlp_gradient(X, Y, pT, sizes, activation, head, block, rows, n_chunks)
    if partial.shape[1] <= _COMBINE_TILE:  # one tile: no thread pool for a few hundred adds
        _combine_columns(partial, out, 0, P + 1)
    else:
        _combine(partial, out[: P + 1])
    out[P + 1] = n


def _run_forward(X, Y, params, sizes, activation, head, out):
    """Shared driver of forward() and loss_sum(); returns the per-chunk losses."""
    n = X.shape[0]
    block = _single_block(X) if sizes.size == 2 else _mlp_block(sizes)
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

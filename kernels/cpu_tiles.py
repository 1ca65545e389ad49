"""Register-tile kernels for one-output models (linear, logistic) with up to 32 features.

Explicit SIMD vectors (``native.simd``) hold a group of rows in registers from their load
through their dot products, the head (on the group's logits at once) and their gradient, so
each value is loaded and widened once and the gradient never leaves registers within a chunk.
They need AVX-512's 32 vector registers (elsewhere their live vectors spill and the pipelined
kernel of ``cpu_passes`` is faster). Chunks are as in ``cpu_passes``: results do not depend on
the thread count.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .native.heads import head_lanes, head_of
from .native.intrinsics import prefetch_at, prefetch_row
from .native.simd import (
    fma,
    hsum,
    hsum4,
    hsum8,
    hsum8x4,
    join8,
    join16,
    lane4,
    lane8,
    load4,
    load8,
    load16,
    load32,
    part8,
    splat4,
    splat8,
    splat16,
    splat32,
    store4,
    store8,
    zero4,
    zero8,
    zero16,
    zero32,
)


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
    q, loss = head_of(z, y, live, binary)
    s0, s1, s2, s3 = lane8(q, 0), lane8(q, 1), lane8(q, 2), lane8(q, 3)
    g0 = _add_rows(g0, s0, s1, s2, s3, x00, x10, x20, x30)
    g1 = _add_rows(g1, s0, s1, s2, s3, x01, x11, x21, x31)
    g2 = _add_rows(g2, s0, s1, s2, s3, x02, x12, x22, x32)
    g3 = _add_rows(g3, s0, s1, s2, s3, x03, x13, x23, x33)
    return g0, g1, g2, g3, q, loss


@njit(inline="always", error_model="numpy")
def _rows8_one_tile(xf, o, d, live, w0):
    """Rows i .. i + live - 1 (live <= 8) of a model with d <= 8 (one vec8 each, widened; rows
    past live read as 0) and their logits without the bias."""
    x0 = load8(xf, o, d if live > 0 else 0)
    x1 = load8(xf, o + d, d if live > 1 else 0)
    x2 = load8(xf, o + 2 * d, d if live > 2 else 0)
    x3 = load8(xf, o + 3 * d, d if live > 3 else 0)
    x4 = load8(xf, o + 4 * d, d if live > 4 else 0)
    x5 = load8(xf, o + 5 * d, d if live > 5 else 0)
    x6 = load8(xf, o + 6 * d, d if live > 6 else 0)
    x7 = load8(xf, o + 7 * d, d if live > 7 else 0)
    z = hsum8(x0 * w0, x1 * w0, x2 * w0, x3 * w0, x4 * w0, x5 * w0, x6 * w0, x7 * w0)
    return x0, x1, x2, x3, x4, x5, x6, x7, z


@njit(inline="always", error_model="numpy")
def _row2(xf, o, count, w0, w1):
    """One row of up to 16 features as two vec8 (widened; lanes past count 0) and the lanes of
    its dot product."""
    x0 = load8(xf, o, count)
    x1 = load8(xf, o + 8, count - 8)
    return x0, x1, fma(x1, w1, x0 * w0)


@njit(inline="always", error_model="numpy")
def _rows8_two_tiles(xf, o, d, live, w0, w1):
    """Rows i .. i + live - 1 (live <= 8) of a model with 8 < d <= 16 (two vec8 each) and their
    logits without the bias."""
    x00, x01, z0 = _row2(xf, o, d if live > 0 else 0, w0, w1)
    x10, x11, z1 = _row2(xf, o + d, d if live > 1 else 0, w0, w1)
    x20, x21, z2 = _row2(xf, o + 2 * d, d if live > 2 else 0, w0, w1)
    x30, x31, z3 = _row2(xf, o + 3 * d, d if live > 3 else 0, w0, w1)
    x40, x41, z4 = _row2(xf, o + 4 * d, d if live > 4 else 0, w0, w1)
    x50, x51, z5 = _row2(xf, o + 5 * d, d if live > 5 else 0, w0, w1)
    x60, x61, z6 = _row2(xf, o + 6 * d, d if live > 6 else 0, w0, w1)
    x70, x71, z7 = _row2(xf, o + 7 * d, d if live > 7 else 0, w0, w1)
    z = hsum8(z0, z1, z2, z3, z4, z5, z6, z7)
    return x00, x10, x20, x30, x40, x50, x60, x70, x01, x11, x21, x31, x41, x51, x61, x71, z


@njit(inline="always", error_model="numpy")
def _group32_one_tile(xf, o, d, live, w0, bias, yf, i, binary, ga, gb, gc, gd):
    """Thirty-two rows (live <= 32) of a model with d <= 8, one register a row, their head on
    one vec32.

    With a row in one register the pass is bound by the head, not by the rows: exp, log1p and
    a division in a chain of about 200 cycles. In groups of eight, one group's head was in
    flight at a time (27 cycles a row at d = 8); as one vec32, LLVM splits every operation of
    the head into four adjacent ones, so four groups' chains run interleaved (7.5 cycles a row;
    a vec16 gave 8). The gradient goes into four accumulators (rows 0 and 4, 1 and 5, ... of
    each eight), summed in a fixed order at the end of the chunk.
    """
    x0, x1, x2, x3, x4, x5, x6, x7, za = _rows8_one_tile(xf, o, d, live, w0)
    x8, x9, x10, x11, x12, x13, x14, x15, zb = _rows8_one_tile(xf, o + 8 * d, d, live - 8, w0)
    u0, u1, u2, u3, u4, u5, u6, u7, zc = _rows8_one_tile(xf, o + 16 * d, d, live - 16, w0)
    v0, v1, v2, v3, v4, v5, v6, v7, zd = _rows8_one_tile(xf, o + 24 * d, d, live - 24, w0)
    y = load32(yf, i, live)
    z = join16(join8(za, zb), join8(zc, zd)) + bias
    q, loss = head_of(z, y, live, binary)
    ga = fma(x4, lane8(q, 4), fma(x0, lane8(q, 0), ga))
    gb = fma(x5, lane8(q, 5), fma(x1, lane8(q, 1), gb))
    gc = fma(x6, lane8(q, 6), fma(x2, lane8(q, 2), gc))
    gd = fma(x7, lane8(q, 7), fma(x3, lane8(q, 3), gd))
    ga = fma(x12, lane8(q, 12), fma(x8, lane8(q, 8), ga))
    gb = fma(x13, lane8(q, 13), fma(x9, lane8(q, 9), gb))
    gc = fma(x14, lane8(q, 14), fma(x10, lane8(q, 10), gc))
    gd = fma(x15, lane8(q, 15), fma(x11, lane8(q, 11), gd))
    ga = fma(u4, lane8(q, 20), fma(u0, lane8(q, 16), ga))
    gb = fma(u5, lane8(q, 21), fma(u1, lane8(q, 17), gb))
    gc = fma(u6, lane8(q, 22), fma(u2, lane8(q, 18), gc))
    gd = fma(u7, lane8(q, 23), fma(u3, lane8(q, 19), gd))
    ga = fma(v4, lane8(q, 28), fma(v0, lane8(q, 24), ga))
    gb = fma(v5, lane8(q, 29), fma(v1, lane8(q, 25), gb))
    gc = fma(v6, lane8(q, 30), fma(v2, lane8(q, 26), gc))
    gd = fma(v7, lane8(q, 31), fma(v3, lane8(q, 27), gd))
    return ga, gb, gc, gd, q, loss


@njit(inline="always", error_model="numpy")
def _group16_two_tiles(xf, o, d, live, w0, w1, bias, yf, i, binary, g0, g1, h0, h1):
    """Sixteen rows (live <= 16) of a model with 8 < d <= 16, two registers a row, their head
    on one vec16 (two groups' heads interleaved, as in ``_group32_one_tile``; at d = 16 0.66 of
    the read ceiling against 0.53 in groups of eight). The gradient of rows 0-7 goes into g0,
    g1 and of rows 8-15 into h0, h1 (summed at the end of the chunk). The 32 row registers do
    not all fit beside the rest: the compiler keeps some on the stack until the gradient."""
    a0, a1, a2, a3, a4, a5, a6, a7, c0, c1, c2, c3, c4, c5, c6, c7, za = _rows8_two_tiles(
        xf, o, d, live, w0, w1
    )
    b0, b1, b2, b3, b4, b5, b6, b7, e0, e1, e2, e3, e4, e5, e6, e7, zb = _rows8_two_tiles(
        xf, o + 8 * d, d, live - 8, w0, w1
    )
    y = load16(yf, i, live)
    z = join8(za, zb) + bias
    q, loss = head_of(z, y, live, binary)
    s0, s1, s2, s3 = lane8(q, 0), lane8(q, 1), lane8(q, 2), lane8(q, 3)
    s4, s5, s6, s7 = lane8(q, 4), lane8(q, 5), lane8(q, 6), lane8(q, 7)
    g0 = _add_rows(g0, s0, s1, s2, s3, a0, a1, a2, a3)
    g0 = _add_rows(g0, s4, s5, s6, s7, a4, a5, a6, a7)
    g1 = _add_rows(g1, s0, s1, s2, s3, c0, c1, c2, c3)
    g1 = _add_rows(g1, s4, s5, s6, s7, c4, c5, c6, c7)
    s0, s1, s2, s3 = lane8(q, 8), lane8(q, 9), lane8(q, 10), lane8(q, 11)
    s4, s5, s6, s7 = lane8(q, 12), lane8(q, 13), lane8(q, 14), lane8(q, 15)
    h0 = _add_rows(h0, s0, s1, s2, s3, b0, b1, b2, b3)
    h0 = _add_rows(h0, s4, s5, s6, s7, b4, b5, b6, b7)
    h1 = _add_rows(h1, s0, s1, s2, s3, e0, e1, e2, e3)
    h1 = _add_rows(h1, s4, s5, s6, s7, e4, e5, e6, e7)
    return g0, g1, h0, h1, q, loss


def _tiles_kernel(group: int, tiles: int = 4):
    """The one-output kernel for groups of ``group`` rows: k == 1 and d <= 8 * tiles.

    ``tiles`` is the number of vec8 registers a row takes: 4 (d <= 32, groups of 4 rows),
    2 (d <= 16, groups of 16) or 1 (d <= 8, groups of 32). Narrow rows take a half or a quarter
    of the loads, products and gradient FMAs, and their larger groups keep several heads in
    flight; they run for both heads.

    Per group: one load of the rows (widened to float64), their dot products reduced together
    (hsum4 / hsum8), the head on the group's logits as one vector, and FMAs into the gradient,
    which stays in four registers for the whole chunk. Returns the (n_chunks, d + 2) partial
    sums: gradient, bias gradient, loss. Chunks are as in cpu_passes (whole blocks, from n and
    the model only), so results do not depend on the thread count.

    ``group`` is a constant of the closure: Numba prunes the other size's branches before typing,
    so each size compiles to a kernel of its own (both in one function, the register allocation
    of each got worse), and a closure over an int stays cacheable. Each gets its own name, so
    each has its own cache index, as two functions would (ranks compiling at once never mix them).

    No fast-math flags here: every fused multiply-add is an explicit fma, so the rounding is
    fixed by the code. With fast-math flags Numba compiled this parallel function differently
    from a fresh compile and from its cache, and the two differed in the last bit
    (tests/unit/test_kernels_cpu.py checks a cached against a fresh compile).
    """

    def kernel(X, Y, w, binary, ahead, chunk_rows, n_chunks):
        n, d = X.shape
        xf = X.reshape(-1)
        yf = Y.reshape(-1)
        row_bytes = d * X.itemsize
        partial = np.empty((n_chunks, d + 2))
        w0, w1, w2, w3 = _row_tiles(w, 0, d)
        if group == 32:
            bias = splat32(w[d])
        elif group == 16:
            bias = splat16(w[d])
        else:
            bias = splat4(w[d])
        for c in prange(n_chunks):
            g0, g1, g2, g3 = zero8(), zero8(), zero8(), zero8()
            if group == 32:
                q_sum, loss_sum = zero32(), zero32()
            elif group == 16:
                q_sum, loss_sum = zero16(), zero16()
            else:
                q_sum, loss_sum = zero4(), zero4()
            start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
            for i in range(start, stop, group):
                live = min(group, stop - i)
                at = (i + ahead) * row_bytes
                for t in range(0, group * row_bytes, 64):
                    prefetch_at(X, at + t)
                if tiles == 1:
                    if live == 32:
                        g0, g1, g2, g3, q, loss = _group32_one_tile(
                            xf, i * d, d, 32, w0, bias, yf, i, binary, g0, g1, g2, g3
                        )
                    else:
                        g0, g1, g2, g3, q, loss = _group32_one_tile(
                            xf, i * d, d, live, w0, bias, yf, i, binary, g0, g1, g2, g3
                        )
                elif tiles == 2:
                    if live == 16:
                        g0, g1, g2, g3, q, loss = _group16_two_tiles(
                            xf, i * d, d, 16, w0, w1, bias, yf, i, binary, g0, g1, g2, g3
                        )
                    else:
                        g0, g1, g2, g3, q, loss = _group16_two_tiles(
                            xf, i * d, d, live, w0, w1, bias, yf, i, binary, g0, g1, g2, g3
                        )
                elif live == 4:
                    g0, g1, g2, g3, q, loss = _tile_group(
                        xf, i * d, d, 4, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3
                    )
                else:
                    g0, g1, g2, g3, q, loss = _tile_group(
                        xf, i * d, d, live, w0, w1, w2, w3, bias, yf, i, binary, g0, g1, g2, g3
                    )
                q_sum = q_sum + q
                loss_sum = loss_sum + loss
            if tiles == 1:  # four accumulators of the one tile
                g0, g1, g2, g3 = (g0 + g1) + (g2 + g3), zero8(), zero8(), zero8()
            elif tiles == 2:  # rows 0-7 and 8-15 of each group, for both tiles
                g0, g1, g2, g3 = g0 + g2, g1 + g3, zero8(), zero8()
            _store_partial(partial[c], d, g0, g1, g2, g3, hsum(q_sum), hsum(loss_sum))
        return partial

    name = (
        "_one_output_tiles"
        + ("" if group == 4 else str(group))
        + ("" if tiles == 4 else f"_{tiles}")
    )
    kernel.__name__ = kernel.__qualname__ = name
    return njit(parallel=True, error_model="numpy", cache=True)(kernel)


@njit(inline="always")
def _store_partial(row, d, g0, g1, g2, g3, q_sum, loss_sum):
    """A chunk's partial sums: gradient (d values from four vec8), bias gradient, loss."""
    store8(row, 0, d, g0)
    store8(row, 8, d - 8, g1)
    store8(row, 16, d - 16, g2)
    store8(row, 24, d - 24, g3)
    row[d] = q_sum
    row[d + 1] = loss_sum


_one_output_tiles = _tiles_kernel(4)  # the squared head: cheap, so rows stay in registers
_one_output_tiles16_2 = _tiles_kernel(16, 2)  # d <= 16, both heads
_one_output_tiles32_1 = _tiles_kernel(32, 1)  # d <= 8, both heads


def tiles_kernel(d: int):
    """The register-tile gradient kernel for d <= 32 features (either head)."""
    if d <= 8:
        return _one_output_tiles32_1
    if d <= 16:
        return _one_output_tiles16_2
    return _one_output_tiles


@njit(inline="always", error_model="numpy")
def _logits8(xf, o, d, live, w0, w1, w2, w3, bias):
    """The logits (a vec8) of rows i .. i + live - 1 (live <= 8) of a one-output model with
    d <= 32 whose first value is ``xf[o]``: the dot products of the register-tile gradient
    kernel for that d (``_group32_one_tile``, ``_group16_two_tiles`` or ``_tile_group``), so the
    same bits where the gradient runs them (``cpu._tiled``)."""
    if d <= 8:
        return _rows8_one_tile(xf, o, d, live, w0)[8] + bias
    if d <= 16:
        return (
            hsum8(
                _row2(xf, o, d if live > 0 else 0, w0, w1)[2],
                _row2(xf, o + d, d if live > 1 else 0, w0, w1)[2],
                _row2(xf, o + 2 * d, d if live > 2 else 0, w0, w1)[2],
                _row2(xf, o + 3 * d, d if live > 3 else 0, w0, w1)[2],
                _row2(xf, o + 4 * d, d if live > 4 else 0, w0, w1)[2],
                _row2(xf, o + 5 * d, d if live > 5 else 0, w0, w1)[2],
                _row2(xf, o + 6 * d, d if live > 6 else 0, w0, w1)[2],
                _row2(xf, o + 7 * d, d if live > 7 else 0, w0, w1)[2],
            )
            + bias
        )
    x00, x01, x02, x03 = _row_tiles(xf, o, d if live > 0 else 0)
    z0 = _dot_tiles(x00, x01, x02, x03, w0, w1, w2, w3)
    x10, x11, x12, x13 = _row_tiles(xf, o + d, d if live > 1 else 0)
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
    return hsum8(z0, z1, z2, z3, z4, z5, z6, z7) + bias


@njit(inline="always", error_model="numpy")
def _prefetch_group(X, i, ahead, row_bytes):
    at = (i + ahead) * row_bytes
    for t in range(0, 8 * row_bytes, 64):
        prefetch_at(X, at + t)


@njit(inline="always", error_model="numpy")
def outputs8(X, xf, i, live, ahead, w0, w1, w2, w3, bias, binary):
    """The outputs (a vec8) of rows i .. i + live - 1: the logit, or for the logistic head its
    sigmoid (``head_lanes``' gradient against a target of 0: the training kernel's bits)."""
    d = X.shape[1]
    _prefetch_group(X, i, ahead, d * X.itemsize)
    z = _logits8(xf, i * d, d, live, w0, w1, w2, w3, bias)
    if binary:
        p, _ = head_lanes(z, zero8(), live, True)
        return p
    return z


@njit(parallel=True, error_model="numpy", cache=True)
def _one_output_forward8(X, w, binary, ahead, chunk_rows, n_chunks, out):
    """Outputs of a one-output model with d <= 32 into ``out`` (n,), eight rows at a time
    (``outputs8``)."""
    n, d = X.shape
    xf = X.reshape(-1)
    w0, w1, w2, w3 = _row_tiles(w, 0, d)
    bias = splat8(w[d])
    for c in prange(n_chunks):
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for i in range(start, stop, 8):
            live = min(8, stop - i)
            store8(out, i, live, outputs8(X, xf, i, live, ahead, w0, w1, w2, w3, bias, binary))


# ---------------------------------------------------------------- wide rows: feature panels


@njit(inline="always", error_model="numpy")
def _x8(xf, i, r, d, o, count, live):
    """Features o .. o + 7 of row i + r (lanes >= count, and rows past live, read as 0)."""
    return load8(xf, (i + r) * d + o, count if live > r else 0)


@njit(inline="always", error_model="numpy")
def _row_dot(xf, i, r, d, live, w):
    """Row r of the group at i (a row past live reads as 0): its dot product with w as the 8
    lanes of a vec8 (summed across lanes by the caller), features 8 at a time in order, even
    and odd panels in two accumulators (the tail in the odd one), added at the end.

    A group's rows are read one after the other, each from its start to its end: the memory
    sees one forward stream. Read panel by panel across the 8 rows (8 accumulators, each
    weight panel loaded once for the eight rows), the rows were eight streams a row apart, and
    from memory that ran at 0.4-0.6 of the read ceiling for d = 64-1024, against 0.8-0.9 in
    this order for d = 64-256. With one accumulator a row, a wide row's products were one chain
    of dependent FMAs, longer than the CPU's window, so rows did not overlap: two chains ran
    d = 512-1024 10-15 % faster from memory.
    """
    full = d // 8
    a, b = zero8(), zero8()
    for h in range(full // 2):
        o = 16 * h
        a = fma(_x8(xf, i, r, d, o, 8, live), load8(w, o, 8), a)
        b = fma(_x8(xf, i, r, d, o + 8, 8, live), load8(w, o + 8, 8), b)
    if full % 2:
        o = 8 * full - 8
        a = fma(_x8(xf, i, r, d, o, 8, live), load8(w, o, 8), a)
    if d > 8 * full:
        o = 8 * full
        b = fma(_x8(xf, i, r, d, o, d - o, live), load8(w, o, d - o), b)
    return a + b


@njit(inline="always", error_model="numpy")
def _grad_panel(xf, i, d, o, count, live, q, g):
    """g[o : o + 8] += the 8 rows' features o .. o + 7 times their lanes of q (d loss / d z):
    rows 0-3 and 4-7 in two chains, added at the end."""
    lo = load8(g, o, 8)
    lo = fma(_x8(xf, i, 0, d, o, count, live), lane8(q, 0), lo)
    lo = fma(_x8(xf, i, 1, d, o, count, live), lane8(q, 1), lo)
    lo = fma(_x8(xf, i, 2, d, o, count, live), lane8(q, 2), lo)
    lo = fma(_x8(xf, i, 3, d, o, count, live), lane8(q, 3), lo)
    hi = _x8(xf, i, 4, d, o, count, live) * lane8(q, 4)
    hi = fma(_x8(xf, i, 5, d, o, count, live), lane8(q, 5), hi)
    hi = fma(_x8(xf, i, 6, d, o, count, live), lane8(q, 6), hi)
    hi = fma(_x8(xf, i, 7, d, o, count, live), lane8(q, 7), hi)
    store8(g, o, 8, lo + hi)


@njit(inline="always", error_model="numpy")
def _panel_group(xf, w, i, d, live, bias, yf, binary, g):
    """Logits, head and gradient of rows i .. i + live - 1 (live <= 8) of a model with d > 40:
    the rows' dot products one row after the other (``_row_dot``), the head on their 8 logits,
    then the gradient panel by panel over the 8 rows, read again from L1."""
    z = (
        hsum8(
            _row_dot(xf, i, 0, d, live, w),
            _row_dot(xf, i, 1, d, live, w),
            _row_dot(xf, i, 2, d, live, w),
            _row_dot(xf, i, 3, d, live, w),
            _row_dot(xf, i, 4, d, live, w),
            _row_dot(xf, i, 5, d, live, w),
            _row_dot(xf, i, 6, d, live, w),
            _row_dot(xf, i, 7, d, live, w),
        )
        + bias
    )
    y = load8(yf, i, live)
    q, loss = head_of(z, y, live, binary)
    full = d // 8
    for p in range(full):
        _grad_panel(xf, i, d, 8 * p, 8, live, q, g)
    if d > 8 * full:
        _grad_panel(xf, i, d, 8 * full, d - 8 * full, live, q, g)
    return q, loss


def _row_at(i, r, d):
    """Where row r of a group of 8 starts in the flat rows: (i + r) d for the rows i .. i + 7
    of X, ``i[r]`` when i is a tuple of the 8 rows' offsets (rows gathered by index)."""


@overload(_row_at, inline="always")
def _row_at_impl(i, r, d):  # noqa: ARG001
    if isinstance(i, types.Integer):
        return lambda i, r, d: (i + r) * d
    if isinstance(i, types.UniTuple):
        return lambda i, r, d: i[r]  # noqa: ARG005
    return None


def _ahead_at(i, ahead, row_bytes):
    """The byte offset of the row ``ahead`` rows after row i (an integer i only: gathered
    groups, a tuple i, prefetch their rows themselves)."""


@overload(_ahead_at, inline="always")
def _ahead_at_impl(i, ahead, row_bytes):  # noqa: ARG001
    if isinstance(i, types.Integer):
        return lambda i, ahead, row_bytes: (i + ahead) * row_bytes
    return lambda i, ahead, row_bytes: 0  # noqa: ARG005


def _y_at(i):
    """Where the targets of a group of rows start: at row i of Y, or at 0 of the group's own
    targets when i is a tuple of the rows' offsets (rows gathered by index)."""


@overload(_y_at, inline="always")
def _y_at_impl(i):
    if isinstance(i, types.Integer):
        return lambda i: i
    return lambda i: 0  # noqa: ARG005


@njit(inline="always", error_model="numpy")
def _x4(xf, i, r, d, o, count, live):
    """Features o .. o + 3 of row r of the group at i (lanes >= count, and rows past live, read
    as 0); i: the first row's number, or the 8 rows' offsets (see ``_row_at``)."""
    return load4(xf, _row_at(i, r, d) + o, count if live > r else 0)


@njit(inline="always", error_model="numpy")
def _dot_panel4(xf, i, d, o, count, live, wp, a):
    """``_dot_panel`` with panels of 4 features (vec4: one 256-bit register on AVX2)."""
    return (
        fma(_x4(xf, i, 0, d, o, count, live), wp, a[0]),
        fma(_x4(xf, i, 1, d, o, count, live), wp, a[1]),
        fma(_x4(xf, i, 2, d, o, count, live), wp, a[2]),
        fma(_x4(xf, i, 3, d, o, count, live), wp, a[3]),
        fma(_x4(xf, i, 4, d, o, count, live), wp, a[4]),
        fma(_x4(xf, i, 5, d, o, count, live), wp, a[5]),
        fma(_x4(xf, i, 6, d, o, count, live), wp, a[6]),
        fma(_x4(xf, i, 7, d, o, count, live), wp, a[7]),
    )


@njit(inline="always", error_model="numpy")
def _grad_panel4(xf, i, d, o, count, live, q, g):
    """``_grad_panel`` with panels of 4 features."""
    lo = load4(g, o, 4)
    lo = fma(_x4(xf, i, 0, d, o, count, live), lane4(q, 0), lo)
    lo = fma(_x4(xf, i, 1, d, o, count, live), lane4(q, 1), lo)
    lo = fma(_x4(xf, i, 2, d, o, count, live), lane4(q, 2), lo)
    lo = fma(_x4(xf, i, 3, d, o, count, live), lane4(q, 3), lo)
    hi = _x4(xf, i, 4, d, o, count, live) * lane4(q, 4)
    hi = fma(_x4(xf, i, 5, d, o, count, live), lane4(q, 5), hi)
    hi = fma(_x4(xf, i, 6, d, o, count, live), lane4(q, 6), hi)
    hi = fma(_x4(xf, i, 7, d, o, count, live), lane4(q, 7), hi)
    store4(g, o, 4, lo + hi)


@njit(inline="always", error_model="numpy")
def _dots4(X, xf, w, i, d, live, ahead):
    """The logits (no bias) of rows i .. i + live - 1 (live <= 8), panels of 4 features. With
    ``ahead`` > 0, at each new cache line of the panels the same line of the 8 rows ``ahead``
    rows on is prefetched (spread over the pass, not one burst a group)."""
    full = d // 4
    z0 = zero4()
    a = (z0, z0, z0, z0, z0, z0, z0, z0)
    rb = d * X.itemsize
    every = max(1, 64 // (4 * X.itemsize))
    for p in range(full):
        if ahead > 0 and p % every == 0:
            at = _ahead_at(i, ahead, rb) + 4 * p * X.itemsize
            for r in range(8):
                prefetch_at(X, at + r * rb)
        a = _dot_panel4(xf, i, d, 4 * p, 4, live, load4(w, 4 * p, 4), a)
    if d > 4 * full:
        o = 4 * full
        a = _dot_panel4(xf, i, d, o, d - o, live, load4(w, o, d - o), a)
    return hsum8x4(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])


@njit(inline="always", error_model="numpy")
def _row_dot4(xf, i, r, d, live, w):
    """``_row_dot`` in panels of 4 features (two vec4 accumulators): the lanes of row r's dot
    product, the row read from its start to its end."""
    full = d // 4
    a, b = zero4(), zero4()
    for h in range(full // 2):
        o = 8 * h
        a = fma(_x4(xf, i, r, d, o, 4, live), load4(w, o, 4), a)
        b = fma(_x4(xf, i, r, d, o + 4, 4, live), load4(w, o + 4, 4), b)
    if full % 2:
        o = 4 * full - 4
        a = fma(_x4(xf, i, r, d, o, 4, live), load4(w, o, 4), a)
    if d > 4 * full:
        o = 4 * full
        b = fma(_x4(xf, i, r, d, o, d - o, live), load4(w, o, d - o), b)
    return a + b


@njit(inline="always", error_model="numpy")
def _grads4(xf, i, d, live, q, g):
    full = d // 4
    for p in range(full):
        _grad_panel4(xf, i, d, 4 * p, 4, live, q, g)
    if d > 4 * full:
        _grad_panel4(xf, i, d, 4 * full, d - 4 * full, live, q, g)


@njit(inline="always", error_model="numpy")
def _grad_half4(xf, i, d, o, count, live, qa, qb, qc, qd, g, r):
    """Features o .. o + 3 of the gradient, over rows r .. r + 3 of the group (their head's
    values qa .. qd, broadcast), added one row after the other: the order of
    ``_dot_grad_row4``, which adds one row at a time while the next group streams in."""
    v = fma(_x4(xf, i, r, d, o, count, live), qa, load4(g, o, 4))
    v = fma(_x4(xf, i, r + 1, d, o, count, live), qb, v)
    v = fma(_x4(xf, i, r + 2, d, o, count, live), qc, v)
    v = fma(_x4(xf, i, r + 3, d, o, count, live), qd, v)
    store4(g, o, 4, v)


@njit(inline="always", error_model="numpy")
def _grads4_rows4(xf, i, d, live, qa, qb, qc, qd, g, r):
    """Rows r .. r + 3 of the group added into the gradient, panel by panel (``_grad_half4``)."""
    full = d // 4
    for p in range(full):
        _grad_half4(xf, i, d, 4 * p, 4, live, qa, qb, qc, qd, g, r)
    if d > 4 * full:
        _grad_half4(xf, i, d, 4 * full, d - 4 * full, live, qa, qb, qc, qd, g, r)


@njit(inline="always", error_model="numpy")
def _grads4_halves(xf, i, d, live, q, g):
    """``_grads4`` in two passes over the gradient, rows 0-3 and then rows 4-7: each panel
    addresses 4 rows, not 8, so their offsets stay in registers (with 8, the AVX2 code reloaded
    row strides from the stack in every panel). Each element of the gradient gets the rows one
    after the other, as in the pipelined groups (``_dot_grad_row4``), so both give the same
    bits; the last group of a pipelined chunk runs this."""
    _grads4_rows4(xf, i, d, live, lane4(q, 0), lane4(q, 1), lane4(q, 2), lane4(q, 3), g, 0)
    _grads4_rows4(xf, i, d, live, lane4(q, 4), lane4(q, 5), lane4(q, 6), lane4(q, 7), g, 4)


@njit(inline="always", error_model="numpy")
def _logits_head4(xf, w, i, d, live, bias, yf, binary):
    """The head's (q, loss) lanes of the 8 rows of a group at i (live <= 8): their dot products
    one row after the other (``_row_dot4``), then the head on the 8 logits. Rows gathered by
    index: i is the tuple of their offsets, yf their own targets."""
    z = (
        hsum8x4(
            _row_dot4(xf, i, 0, d, live, w),
            _row_dot4(xf, i, 1, d, live, w),
            _row_dot4(xf, i, 2, d, live, w),
            _row_dot4(xf, i, 3, d, live, w),
            _row_dot4(xf, i, 4, d, live, w),
            _row_dot4(xf, i, 5, d, live, w),
            _row_dot4(xf, i, 6, d, live, w),
            _row_dot4(xf, i, 7, d, live, w),
        )
        + bias
    )
    y = load8(yf, _y_at(i), live)
    q, loss = head_of(z, y, live, binary)
    return q, loss


@njit(inline="always", error_model="numpy")
def _panel_group4(xf, w, i, d, live, bias, yf, binary, g):
    """``_panel_group`` with panels of 4 features: two 256-bit accumulators a row, and the
    gradient in two passes of 4 rows (``_grads4_halves``), so the group fits AVX2's 16 vector
    registers and its row offsets the general ones (the head is still one vec8: two registers
    there). The same bits as the pipelined groups (``_pipelined_group4``); rows gathered by
    index run the same arithmetic in ``_taken_group4``."""
    q, loss = _logits_head4(xf, w, i, d, live, bias, yf, binary)
    _grads4_halves(xf, i, d, live, q, g)
    return q, loss


@njit(inline="always", error_model="numpy")
def _dot_grad_row4(xf, n, r, d, n_live, w, c, qr, g):
    """Row r of the next group (at n, n_live rows): its dot product's lanes, as ``_row_dot4``;
    in the same loop row r of the current (full) group at c added into the gradient with its
    head's value qr. Each element of the gradient gets the rows one after the other, so the
    group's two passes run as one stream: the rows of the next group keep arriving while the
    current one's gradient is formed from L1."""
    full = d // 4
    a, b = zero4(), zero4()
    for h in range(full // 2):
        o = 8 * h
        a = fma(_x4(xf, n, r, d, o, 4, n_live), load4(w, o, 4), a)
        b = fma(_x4(xf, n, r, d, o + 4, 4, n_live), load4(w, o + 4, 4), b)
        store4(g, o, 4, fma(_x4(xf, c, r, d, o, 4, 8), qr, load4(g, o, 4)))
        store4(g, o + 4, 4, fma(_x4(xf, c, r, d, o + 4, 4, 8), qr, load4(g, o + 4, 4)))
    if full % 2:
        o = 4 * full - 4
        a = fma(_x4(xf, n, r, d, o, 4, n_live), load4(w, o, 4), a)
        store4(g, o, 4, fma(_x4(xf, c, r, d, o, 4, 8), qr, load4(g, o, 4)))
    if d > 4 * full:
        o = 4 * full
        b = fma(_x4(xf, n, r, d, o, d - o, n_live), load4(w, o, d - o), b)
        store4(g, o, 4, fma(_x4(xf, c, r, d, o, d - o, 8), qr, load4(g, o, 4)))
    return a + b


@njit(inline="always", error_model="numpy")
def _pipelined_group4(xf, w, n, n_live, d, c, q, g, bias, yf, binary):
    """The head's (q, loss) lanes of the next group (at n, n_live <= 8 rows), whose rows are
    read in the same pass as the current group's (at c, 8 rows, head values q) gradient
    (``_dot_grad_row4``)."""
    z = (
        hsum8x4(
            _dot_grad_row4(xf, n, 0, d, n_live, w, c, lane4(q, 0), g),
            _dot_grad_row4(xf, n, 1, d, n_live, w, c, lane4(q, 1), g),
            _dot_grad_row4(xf, n, 2, d, n_live, w, c, lane4(q, 2), g),
            _dot_grad_row4(xf, n, 3, d, n_live, w, c, lane4(q, 3), g),
            _dot_grad_row4(xf, n, 4, d, n_live, w, c, lane4(q, 4), g),
            _dot_grad_row4(xf, n, 5, d, n_live, w, c, lane4(q, 5), g),
            _dot_grad_row4(xf, n, 6, d, n_live, w, c, lane4(q, 6), g),
            _dot_grad_row4(xf, n, 7, d, n_live, w, c, lane4(q, 7), g),
        )
        + bias
    )
    y = load8(yf, n, n_live)
    q, loss = head_of(z, y, n_live, binary)
    return q, loss


@njit(inline="always", error_model="numpy")
def _panel_group4x16(X, xf, w, i, d, live, bias, yf, binary, g, ahead):
    """Sixteen rows (live <= 16) in 4-feature panels, for rows of up to 40 features: the
    logits of rows 0-7 and 8-15 one after the other (8 accumulators each), their head on one
    vec16 so that the two groups' heads run interleaved (the head is most of the work there)."""
    rb = d * X.itemsize
    at = (i + ahead) * rb
    for t in range(0, 16 * rb, 64):
        prefetch_at(X, at + t)
    za = _dots4(X, xf, w, i, d, live, 0)
    zb = _dots4(X, xf, w, i + 8, d, live - 8, 0)
    y = load16(yf, i, live)
    z = join8(za, zb) + bias
    q, loss = head_of(z, y, live, binary)
    _grads4(xf, i, d, live, part8(q, 0), g)
    _grads4(xf, i + 8, d, live - 8, part8(q, 1), g)
    return q, loss


def _panels_kernel(lanes: int, group: int = 8):
    """The one-output gradient in feature panels of ``lanes`` (8: AVX-512, 4: AVX2) features.

    Eight rows at a time: their dot products one row after the other (two accumulators of
    ``lanes`` lanes a row, so the group's rows are read in memory order: ``_row_dot``), the head
    on the 8 logits as one vec8, then the gradient panel by panel over the eight rows (the rows
    read again from L1 and widened again; the gradient, d float64 per chunk, stays in L1; for
    AVX2 over rows 0-3, then rows 4-7). Where the AVX2 groups run faster pipelined (a Zen 3
    CPU), ``_one_output_pipelined4`` runs them instead, with the same bits. For AVX-512 this
    runs rows wider than 40 features
    (``cpu.PANEL4_WIDTH``): with rows this wide a group's work is long enough to hide the head's
    latency. 16-row groups were slower from memory, and LLVM's own vectorisation of the
    pipelined passes (``cpu_passes``) reached 0.35-0.6 of the read ceiling for d = 64-1024.
    Chunks are as in the other kernels: results do not depend on the thread count. ``ahead``:
    prefetch distance in rows, used by the 16-row groups of narrow rows (a wide row's own stream
    is what the hardware prefetchers follow best; software prefetch of the next group, in one
    burst or spread over the row, was slower). ``lanes`` is a constant of the closure, each size
    a kernel (and cache index) of its own, as for ``_tiles_kernel``.
    """

    def kernel(X, Y, w, binary, ahead, chunk_rows, n_chunks):
        n, d = X.shape
        xf = X.reshape(-1)
        yf = Y.reshape(-1)
        partial = np.empty((n_chunks, d + 2))
        bias = splat16(w[d]) if group == 16 else splat8(w[d])
        padded = (d + lanes - 1) // lanes * lanes
        for c in prange(n_chunks):
            g = np.zeros(padded)
            if group == 16:
                q_sum, loss_sum = zero16(), zero16()
            else:
                q_sum, loss_sum = zero8(), zero8()
            start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
            for i in range(start, stop, group):
                live = min(group, stop - i)
                if group == 16:
                    if live == 16:
                        q, loss = _panel_group4x16(X, xf, w, i, d, 16, bias, yf, binary, g, ahead)
                    else:
                        q, loss = _panel_group4x16(X, xf, w, i, d, live, bias, yf, binary, g, ahead)
                elif lanes == 8:
                    if live == 8:
                        q, loss = _panel_group(xf, w, i, d, 8, bias, yf, binary, g)
                    else:
                        q, loss = _panel_group(xf, w, i, d, live, bias, yf, binary, g)
                elif live == 8:
                    q, loss = _panel_group4(xf, w, i, d, 8, bias, yf, binary, g)
                else:
                    q, loss = _panel_group4(xf, w, i, d, live, bias, yf, binary, g)
                q_sum = q_sum + q
                loss_sum = loss_sum + loss
            for j in range(d):
                partial[c, j] = g[j]
            partial[c, d] = hsum(q_sum)
            partial[c, d + 1] = hsum(loss_sum)
        return partial

    name = "_one_output_panels" + ("" if lanes == 8 else "4") + ("" if group == 8 else "x16")
    kernel.__name__ = kernel.__qualname__ = name
    return njit(parallel=True, error_model="numpy", cache=True)(kernel)


_one_output_panels = _panels_kernel(8)  # AVX-512, d > 40
_one_output_panels4 = _panels_kernel(4)  # AVX2, d > 40


@njit(error_model="numpy", cache=True)
def _pipelined_chunk4(X, Y, w, binary, start, stop, out):
    """One chunk (rows start .. stop - 1) of ``_one_output_pipelined4``, into ``out`` (d + 2).

    The groups of 8 rows of ``_panels_kernel`` in 4-feature panels, pipelined: group k + 1's
    rows are read, row r of it in the same loop as row r of group k added into the gradient
    (``_pipelined_group4``), and its head runs after its 8 rows; the chunk's last group is added
    alone (``_grads4_halves``). So the rows stream without the pause of a second pass over each
    group. A function of its own, called from the ``prange`` loop, as ``_taken_chunk``: it
    compiles in about a third of the time of the kernel with the groups inlined there, and ran
    as fast (Zen 3, 256 MiB of float32 rows, 2 threads, fractions of the read ceiling at d = 64
    / 256 / 1024: 0.66 / 0.76 / 0.73 against 0.68 / 0.77 / 0.73 inlined and 0.61 / 0.71 / 0.68
    for the two passes). On a Zen 4 CPU running AVX2 code the two passes were faster (0.79 /
    0.80 / 0.73 against 0.64 / 0.60 / 0.52): ``cpu.PIPELINED_CPUS`` says where this runs."""
    d = X.shape[1]
    xf = X.reshape(-1)
    yf = Y.reshape(-1)
    bias = splat8(w[d])
    g = np.zeros((d + 3) // 4 * 4)
    q_sum, loss_sum = zero8(), zero8()
    if start < stop:
        live = min(8, stop - start)
        if live == 8:
            q, loss = _logits_head4(xf, w, start, d, 8, bias, yf, binary)
        else:
            q, loss = _logits_head4(xf, w, start, d, live, bias, yf, binary)
        for i in range(start, stop, 8):
            q_sum = q_sum + q
            loss_sum = loss_sum + loss
            after = min(8, stop - i - 8)
            if after == 8:
                q, loss = _pipelined_group4(xf, w, i + 8, 8, d, i, q, g, bias, yf, binary)
            elif after > 0:
                q, loss = _pipelined_group4(xf, w, i + 8, after, d, i, q, g, bias, yf, binary)
            else:
                _grads4_halves(xf, i, d, min(8, stop - i), q, g)
    for j in range(d):
        out[j] = g[j]
    out[d] = hsum(q_sum)
    out[d + 1] = hsum(loss_sum)


@njit(parallel=True, error_model="numpy", cache=True)
def _one_output_pipelined4(X, Y, w, binary, ahead, chunk_rows, n_chunks):  # noqa: ARG001
    """``_one_output_panels4`` with the groups pipelined, chunk by chunk
    (``_pipelined_chunk4``): the same bits. ``ahead`` is unused (the signature of the other
    kernels)."""
    n = X.shape[0]
    partial = np.empty((n_chunks, X.shape[1] + 2))
    for c in prange(n_chunks):
        start = c * chunk_rows
        _pipelined_chunk4(X, Y, w, binary, start, min(n, start + chunk_rows), partial[c])
    return partial


_one_output_panels4x16 = _panels_kernel(4, 16)  # d <= 40 (AVX-512: 17-40, not the tiles)


# ---- the same kernels on rows taken by index (a mini-batch, no copy of its rows) -------------


@njit(inline="always")
def _offsets8(rows, i, stop, d):
    """The offsets in the flat rows of rows[i .. i + 7] (rows from ``stop`` on: the last
    row's, read as 0 by the group anyway)."""
    last = stop - 1
    return (
        np.int64(rows[min(i, last)]) * d,
        np.int64(rows[min(i + 1, last)]) * d,
        np.int64(rows[min(i + 2, last)]) * d,
        np.int64(rows[min(i + 3, last)]) * d,
        np.int64(rows[min(i + 4, last)]) * d,
        np.int64(rows[min(i + 5, last)]) * d,
        np.int64(rows[min(i + 6, last)]) * d,
        np.int64(rows[min(i + 7, last)]) * d,
    )


@njit(inline="always")
def _prefetch_taken(X, yf, rows, i, ahead, a, b):
    """Prefetch rows ``rows[i + ahead + a .. i + ahead + b - 1]`` (those in the batch): their
    lines and targets."""
    for r in range(a, b):
        if i + ahead + r < rows.size:
            later = rows[i + ahead + r]
            prefetch_row(X, later)
            prefetch_at(yf, np.int64(later) * 8)


@njit(inline="always", error_model="numpy")
def _taken_group4x16(X, xf, w, at0, at1, d, live, bias, yb, binary, g, yf, rows, i, ahead):
    """``_panel_group4x16`` of 16 rows taken by index (offsets at0, at1; yb: their targets).
    The 16 rows ``ahead`` rows on (rows[i + ahead ...]) are prefetched four at a time between
    the group's four phases, not in one burst at its start: on a Zen 3 CPU (2,078 random rows
    of 2M, d = 32, one thread) 73 against 97 us a batch from memory. A burst of 48 prefetches is
    more misses than a core keeps in flight; most likely the group's loads waited behind it."""
    _prefetch_taken(X, yf, rows, i, ahead, 0, 4)
    za = _dots4(X, xf, w, at0, d, live, 0)
    _prefetch_taken(X, yf, rows, i, ahead, 4, 8)
    zb = _dots4(X, xf, w, at1, d, live - 8, 0)
    _prefetch_taken(X, yf, rows, i, ahead, 8, 12)
    y = load16(yb, 0, live)
    z = join8(za, zb) + bias
    q, loss = head_of(z, y, live, binary)
    _grads4(xf, at0, d, live, part8(q, 0), g)
    _prefetch_taken(X, yf, rows, i, ahead, 12, 16)
    _grads4(xf, at1, d, live - 8, part8(q, 1), g)
    return q, loss


@njit(inline="always", error_model="numpy")
def _taken_group4(X, xf, w, at, d, live, bias, yb, binary, g, yf, rows, i, ahead):
    """``_panel_group4`` of 8 rows taken by index (offsets at; yb: their targets), the same
    arithmetic, so the bits of both AVX2 wide-row kernels (two passes and pipelined). The 8
    rows ``ahead`` rows on are prefetched in three parts, before the dot products, after the
    head and between the gradient's two passes (as ``_taken_group4x16``;
    on a Zen 3 CPU, d = 64, 2,078 random rows of 1M, one thread: 160 against 220 us a batch
    from memory, with ``ahead`` one group where 16 rows gained a few per cent)."""
    _prefetch_taken(X, yf, rows, i, ahead, 0, 3)
    q, loss = _logits_head4(xf, w, at, d, live, bias, yb, binary)
    _prefetch_taken(X, yf, rows, i, ahead, 3, 6)
    _grads4_rows4(xf, at, d, live, lane4(q, 0), lane4(q, 1), lane4(q, 2), lane4(q, 3), g, 0)
    _prefetch_taken(X, yf, rows, i, ahead, 6, 8)
    _grads4_rows4(xf, at, d, live, lane4(q, 4), lane4(q, 5), lane4(q, 6), lane4(q, 7), g, 4)
    return q, loss


@njit(inline="always")
def _taken_targets(yf, rows, i, live, yb):
    """yb[:live] = the targets of the rows ``rows[i : i + live]``."""
    for r in range(live):
        yb[r] = yf[rows[i + r]]


def _taken_chunk(group: int):
    """One chunk of ``_one_output_panels4`` (group 8) or ``_one_output_panels4x16`` (group 16)
    on the rows ``X[rows]``, read where they are: the same groups and arithmetic as the kernel on
    a copy of those rows, so the same bits, without the copy. The next group's rows (``group``
    rows on) are prefetched (and their targets), a few at a time between the group's phases:
    their cache misses overlap the groups' arithmetic.

    A function of its own, called from a ``prange`` loop (``_taken_panels4``): it compiles once,
    outside Numba's parfor passes, which over the inlined groups take most of the panel
    kernels' compile time. ``group`` is a constant of the closure, each value a function (and
    cache entry) of its own."""

    def chunk(X, Y, rows, w, binary, start, stop, out):
        d = X.shape[1]
        xf, yf = X.reshape(-1), Y.reshape(-1)
        g = np.zeros((d + 3) // 4 * 4)
        yb = np.zeros(group)
        if group == 16:
            bias = splat16(w[d])
            q_sum, loss_sum = zero16(), zero16()
        else:
            bias = splat8(w[d])
            q_sum, loss_sum = zero8(), zero8()
        for i in range(start, stop, group):
            live = min(group, stop - i)
            _taken_targets(yf, rows, i, live, yb)
            if group == 16:
                at0, at1 = _offsets8(rows, i, stop, d), _offsets8(rows, i + 8, stop, d)
                if live == 16:
                    q, loss = _taken_group4x16(
                        X, xf, w, at0, at1, d, 16, bias, yb, binary, g, yf, rows, i, group
                    )
                else:
                    q, loss = _taken_group4x16(
                        X, xf, w, at0, at1, d, live, bias, yb, binary, g, yf, rows, i, group
                    )
            else:
                at = _offsets8(rows, i, stop, d)
                if live == 8:
                    q, loss = _taken_group4(
                        X, xf, w, at, d, 8, bias, yb, binary, g, yf, rows, i, group
                    )
                else:
                    q, loss = _taken_group4(
                        X, xf, w, at, d, live, bias, yb, binary, g, yf, rows, i, group
                    )
            q_sum = q_sum + q
            loss_sum = loss_sum + loss
        for j in range(d):
            out[j] = g[j]
        out[d] = hsum(q_sum)
        out[d + 1] = hsum(loss_sum)

    name = "_taken_chunk4" + ("x16" if group == 16 else "")
    chunk.__name__ = chunk.__qualname__ = name
    return njit(error_model="numpy", cache=True)(chunk)


_taken_chunk4 = _taken_chunk(8)
_taken_chunk4x16 = _taken_chunk(16)


@njit(parallel=True, error_model="numpy", cache=True)
def _taken_panels4(X, Y, rows, w, binary, chunk_rows, n_chunks):
    """``_one_output_panels4`` on the rows ``X[rows]`` (targets ``Y[rows]``), read in place."""
    n = rows.size
    partial = np.empty((n_chunks, X.shape[1] + 2))
    for c in prange(n_chunks):
        start = c * chunk_rows
        _taken_chunk4(X, Y, rows, w, binary, start, min(n, start + chunk_rows), partial[c])
    return partial


@njit(parallel=True, error_model="numpy", cache=True)
def _taken_panels4x16(X, Y, rows, w, binary, chunk_rows, n_chunks):
    """``_one_output_panels4x16`` on the rows ``X[rows]`` (targets ``Y[rows]``), in place."""
    n = rows.size
    partial = np.empty((n_chunks, X.shape[1] + 2))
    for c in prange(n_chunks):
        start = c * chunk_rows
        stop = min(n, start + chunk_rows)
        _taken_chunk4x16(X, Y, rows, w, binary, start, stop, partial[c])
    return partial

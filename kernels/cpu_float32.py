"""One-output gradient with float32 products (``train.products = "float32"``), rows of d > 40.

The float64 kernels widen every float32 element of X twice (once for its row's dot product,
once for the gradient) and multiply in float64: on the widest rows that work is about as fast
as the memory (three bench runs on an AVX-512 Zen 4: d = 512-1024 0.44-0.75 of the read
ceiling, d = 64-256 0.74-0.91). Here the float32 elements are used as they are read:

- a row's dot product with the weights rounded to float32: float32 products, summed in float32
  by the vectorised loop (several partial sums, added at the end), then widened, plus the
  float64 bias;
- the head (loss, d loss / d z) in float64 on eight rows at once, as in the other kernels;
- the gradient contribution of eight rows, ``sum_r x_r * q_r`` with q rounded to float32, in
  float32, added into the chunk's float64 gradient.

So every float32 sum has at most d or 8 terms, and everything across row groups and chunks is
float64: gradients agree with the float64 reference to about 1e-7 relative (tests hold them to
1e-6). Chunks are those of the other kernels, so results do not depend on the thread count or
on how rows are split between ranks. The loops are left to LLVM's vectoriser (``fastmath``'s
reassociation lets it split the float32 sums over vector lanes); its code is the same for any
thread count, so the bits are too.
"""

import numpy as np
from numba import njit, prange

from .native.heads import head_of
from .native.simd import hsum, load8, splat8, store8, zero8

# reassociation: the dot products' float32 sums vectorise; contraction: their products and sums
# fuse. No flag that assumes away NaN or infinity: those still propagate to the result.
_FLAGS = {"reassoc", "contract", "nsz"}
GROUP = 8  # rows whose head runs as one vec8 and whose gradient terms are summed in float32


@njit(inline="always", fastmath=_FLAGS, error_model="numpy")
def _dots(X, i, live, w, z):
    """z[r] = float32 dot product of row i + r with w (r < live), widened."""
    d = X.shape[1]
    for r in range(live):
        s = np.float32(0.0)
        for j in range(d):
            s += X[i + r, j] * w[j]
        z[r] = np.float64(s)


@njit(inline="always", fastmath=_FLAGS, error_model="numpy")
def _add_group(X, i, live, q, g, gb):
    """g += sum over rows r < live of X[i + r] * q[r], the sum over the group in float32."""
    d = X.shape[1]
    if live == GROUP:
        q0, q1, q2, q3, q4, q5, q6, q7 = q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]
        for j in range(d):
            lo = X[i, j] * q0 + X[i + 1, j] * q1 + X[i + 2, j] * q2 + X[i + 3, j] * q3
            hi = X[i + 4, j] * q4 + X[i + 5, j] * q5 + X[i + 6, j] * q6 + X[i + 7, j] * q7
            g[j] += np.float64(lo + hi)
        return
    q0 = q[0]
    for j in range(d):
        gb[j] = X[i, j] * q0
    for r in range(1, live):
        qr = q[r]
        for j in range(d):
            gb[j] += X[i + r, j] * qr
    for j in range(d):
        g[j] += np.float64(gb[j])


@njit(parallel=True, fastmath=_FLAGS, error_model="numpy", cache=True)
def one_output_float32(X, Y, w, binary, chunk_rows, n_chunks):
    """Per-chunk sums (n_chunks, d + 2) of the gradient over weights, d loss / d z and the loss
    of a one-output model on float32 rows X (n, d); w holds d weights and the bias (float64)."""
    n, d = X.shape
    yf = Y.reshape(-1)
    w32 = w[:d].astype(np.float32)
    bias = splat8(w[d])
    partial = np.empty((n_chunks, d + 2))
    for c in prange(n_chunks):
        g = np.zeros(d)
        gb = np.empty(d, np.float32)
        z = np.zeros(GROUP)
        qb = np.empty(GROUP)
        q = np.empty(GROUP, np.float32)
        q_sum, loss_sum = zero8(), zero8()
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for i in range(start, stop, GROUP):
            live = min(GROUP, stop - i)
            _dots(X, i, live, w32, z)
            zv = load8(z, 0, live) + bias
            yv = load8(yf, i, live)
            qv, loss = head_of(zv, yv, live, binary)
            q_sum = q_sum + qv
            loss_sum = loss_sum + loss
            store8(qb, 0, GROUP, qv)
            for r in range(GROUP):
                q[r] = np.float32(qb[r])
            _add_group(X, i, live, q, g, gb)
        for j in range(d):
            partial[c, j] = g[j]
        partial[c, d] = hsum(q_sum)
        partial[c, d + 1] = hsum(loss_sum)
    return partial

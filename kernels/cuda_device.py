"""The device side of the CUDA backend (``cuda``): every ``numba.cuda`` kernel and device function.

They are built on first use by ``_kernels()``, once numba.cuda is known to be usable (a GPU, or
the simulator), so importing this module never needs a GPU. ``cuda``'s docstring describes the
design (one-layer fast paths, the general kernel's per-block scratch, the fixed-order sums).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

from numba import float64

from . import BINARY, SIGMOID, SQUARED, TANH

try:  # numba.cuda imports without a GPU; only a numba built without CUDA support lacks it.
    from numba import cuda
except ImportError:  # pragma: no cover - depends on the numba build
    cuda = None

MAX_TPB = 256  # most threads per block; the shared reduction buffer is sized for it
RED_CHUNK = 16  # values reduced per shared-memory pass: MAX_TPB x RED_CHUNK float64 = 32 KiB
FAST_MAX_ACC = 128  # per-thread float64 accumulators of the one-layer fast paths (P + 1 <= this)
FAST_MAX_K = 64  # per-thread logits of the (d, k) fast path; P + 1 <= 128 implies k <= 63

# Rows of the general kernel's layout table (int64, shape (4, L + 1)).
_SIZES, _P_OFF, _A_OFF, _D_OFF = 0, 1, 2, 3


# ---- device functions and kernels (built on first use) -----------------------------------------
@functools.cache
def _kernels() -> SimpleNamespace:
    """Compile-on-demand dispatchers for every kernel; built once, after numba.cuda is known."""

    @cuda.jit(device=True)
    def sigmoid(z):
        """1 / (1 + e^-z) without overflow for either sign of z."""
        if z >= 0.0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    # Device code avoids the max()/min() builtins: Numba's built-in CUDA target fails to compile
    # their *args overloads ("Signature mismatch"), so comparisons are written out.
    @cuda.jit(device=True)
    def relu(z):
        return z if z > 0.0 else 0.0

    @cuda.jit(device=True)
    def row_max(z, z0, k):
        """Largest of z[z0 : z0 + k] (k >= 1)."""
        mx = z[z0]
        for j in range(1, k):
            v = z[z0 + j]
            mx = v if v > mx else mx
        return mx

    @cuda.jit(device=True)
    def activate(z, activation):
        if activation == SIGMOID:
            return sigmoid(z)
        if activation == TANH:
            return math.tanh(z)
        return relu(z)

    @cuda.jit(device=True)
    def slope(a, activation):
        """d activation / dz written with the activation's output a (all three allow it)."""
        if activation == SIGMOID:
            return a * (1.0 - a)
        if activation == TANH:
            return 1.0 - a * a
        return 1.0 if a > 0.0 else 0.0

    @cuda.jit(device=True)
    def binary_loss(z, t):
        """Log-loss max(z,0) - t z + log1p(e^-|z|) and its slope sigmoid(z) - t."""
        e = math.exp(-abs(z))
        loss = relu(z) - t * z + math.log1p(e)
        p = 1.0 / (1.0 + e) if z >= 0.0 else e / (1.0 + e)
        return loss, p - t

    @cuda.jit(device=True)
    def head_delta(z, z0, k, y2, r, head):
        """Row r's loss; the logits z[z0 : z0 + k] are overwritten with d loss / d logits."""
        if head == SQUARED:
            loss = 0.0
            for j in range(k):
                e = z[z0 + j] - y2[r, j]
                loss += e * e
                z[z0 + j] = 2.0 * e
            return loss
        if head == BINARY:
            loss, g = binary_loss(z[z0], y2[r, 0])
            z[z0] = g
            return loss
        cls = int(y2[r, 0])
        zc = z[z0 + cls] if 0 <= cls < k else math.nan
        mx = row_max(z, z0, k)
        s = 0.0
        for j in range(k):
            e = math.exp(z[z0 + j] - mx)
            z[z0 + j] = e
            s += e
        for j in range(k):
            z[z0 + j] = z[z0 + j] / s - (1.0 if j == cls else 0.0)
        return mx + math.log(s) - zc

    @cuda.jit(device=True)
    def head_output(z, z0, k, head, dst):
        """dst[:k] = model output from logits z[z0 : z0 + k] (value, P(class 1), probabilities)."""
        if head == SQUARED:
            for j in range(k):
                dst[j] = z[z0 + j]
        elif head == BINARY:
            for j in range(k):
                dst[j] = sigmoid(z[z0 + j])
        else:
            mx = row_max(z, z0, k)
            s = 0.0
            for j in range(k):
                e = math.exp(z[z0 + j] - mx)
                dst[j] = e
                s += e
            for j in range(k):
                dst[j] = dst[j] / s

    @cuda.jit(device=True)
    def block_reduce_store(acc, count, sh, partial):
        """partial[block, :count] = sum over the block's threads of acc[:count] (fixed tree)."""
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        blk = cuda.blockIdx.x
        for c0 in range(0, count, RED_CHUNK):
            w = RED_CHUNK if count - c0 > RED_CHUNK else count - c0
            for c in range(w):
                sh[t, c] = acc[c0 + c]
            cuda.syncthreads()
            s = nt // 2
            while s > 0:
                if t < s:
                    for c in range(w):
                        sh[t, c] += sh[t + s, c]
                cuda.syncthreads()
                s //= 2
            for c in range(t, w, nt):
                partial[blk, c0 + c] = sh[0, c]
            cuda.syncthreads()

    @cuda.jit
    def grad_glm1(X, y2, params, head, partial):
        """Fast path for (d, 1) models (linear, logistic): z = x.w + b in a register."""
        acc = cuda.local.array(FAST_MAX_ACC, float64)
        sh = cuda.shared.array((MAX_TPB, RED_CHUNK), float64)
        n, d = X.shape[0], X.shape[1]
        for q in range(d + 2):
            acc[q] = 0.0
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        for r in range(start, n, cuda.blockDim.x * cuda.gridDim.x):
            z = params[d]
            for i in range(d):
                z += X[r, i] * params[i]
            if head == SQUARED:
                e = z - y2[r, 0]
                loss = e * e
                g = 2.0 * e
            else:
                loss, g = binary_loss(z, y2[r, 0])
            for i in range(d):
                acc[i] += g * X[r, i]
            acc[d] += g
            acc[d + 1] += loss
        block_reduce_store(acc, d + 2, sh, partial)

    @cuda.jit
    def grad_glmk(X, y2, params, k, head, partial):
        """Fast path for (d, k) models (softmax, multi-output squared): logits in local memory."""
        acc = cuda.local.array(FAST_MAX_ACC, float64)
        z = cuda.local.array(FAST_MAX_K, float64)
        sh = cuda.shared.array((MAX_TPB, RED_CHUNK), float64)
        n, d = X.shape[0], X.shape[1]
        count = (d + 1) * k + 1
        for q in range(count):
            acc[q] = 0.0
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        for r in range(start, n, cuda.blockDim.x * cuda.gridDim.x):
            for j in range(k):
                z[j] = params[d * k + j]
            for i in range(d):
                xi = X[r, i]
                for j in range(k):
                    z[j] += xi * params[i * k + j]
            acc[count - 1] += head_delta(z, 0, k, y2, r, head)
            for i in range(d):
                xi = X[r, i]
                for j in range(k):
                    acc[i * k + j] += xi * z[j]
            for j in range(k):
                acc[d * k + j] += z[j]
        block_reduce_store(acc, count, sh, partial)

    @cuda.jit(device=True)
    def dense(src, s0, params, p0, n_in, n_out, dst, d0):
        """dst[d0 + j] = b_j + sum_i src[s0 + i] W[i, j] for the layer whose W starts at p0."""
        b0 = p0 + n_in * n_out
        for j in range(n_out):
            a = params[b0 + j]
            for i in range(n_in):
                a += src[s0 + i] * params[p0 + i * n_out + j]
            dst[d0 + j] = a

    @cuda.jit(device=True)
    def row_forward(x, params, lay, n_layers, activation, mine):
        """Run one row x through every layer: hidden activations and final logits go to mine."""
        last = n_layers - 1
        for layer in range(n_layers):
            n_in, n_out = lay[_SIZES, layer], lay[_SIZES, layer + 1]
            d0 = lay[_D_OFF, n_layers] if layer == last else lay[_A_OFF, layer + 1]
            if layer == 0:
                dense(x, 0, params, lay[_P_OFF, 0], n_in, n_out, mine, d0)
            else:
                dense(mine, lay[_A_OFF, layer], params, lay[_P_OFF, layer], n_in, n_out, mine, d0)
            if layer != last:
                for j in range(n_out):
                    mine[d0 + j] = activate(mine[d0 + j], activation)

    @cuda.jit(device=True)
    def row_backward(params, lay, n_layers, activation, mine):
        """Back-propagate the output delta in mine down to every hidden layer's delta."""
        for layer in range(n_layers - 1, 0, -1):
            n_in, n_out = lay[_SIZES, layer], lay[_SIZES, layer + 1]
            p0, up = lay[_P_OFF, layer], lay[_D_OFF, layer + 1]
            a0, d0 = lay[_A_OFF, layer], lay[_D_OFF, layer]
            for i in range(n_in):
                s = 0.0
                for j in range(n_out):
                    s += params[p0 + i * n_out + j] * mine[up + j]
                mine[d0 + i] = s * slope(mine[a0 + i], activation)

    @cuda.jit(device=True)
    def tile_sum(X, r0, m, lay, n_layers, scratch, blk, q):
        """Sum over the tile's m rows of d loss_row / d param q (q == P: of the loss)."""
        acc = 0.0
        if q == lay[_P_OFF, n_layers]:
            for rr in range(m):
                acc += scratch[blk, scratch.shape[1] - 1, rr]
            return acc
        layer = 0
        while q >= lay[_P_OFF, layer + 1]:
            layer += 1
        n_in, n_out = lay[_SIZES, layer], lay[_SIZES, layer + 1]
        loc = q - lay[_P_OFF, layer]
        if loc >= n_in * n_out:  # a bias: the delta itself
            dj = lay[_D_OFF, layer + 1] + loc - n_in * n_out
            for rr in range(m):
                acc += scratch[blk, dj, rr]
            return acc
        i = loc // n_out
        dj = lay[_D_OFF, layer + 1] + loc - i * n_out
        if layer == 0:
            for rr in range(m):
                acc += X[r0 + rr, i] * scratch[blk, dj, rr]
        else:
            ai = lay[_A_OFF, layer] + i
            for rr in range(m):
                acc += scratch[blk, ai, rr] * scratch[blk, dj, rr]
        return acc

    @cuda.jit
    def grad_mlp(X, y2, params, lay, n_layers, activation, head, scratch, partial):
        """General gradient: per tile, rows in parallel (phase A), then parameters (phase B)."""
        t, nt, blk = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
        n, n_par = X.shape[0], params.shape[0]
        k, z0, loss_at = lay[_SIZES, n_layers], lay[_D_OFF, n_layers], scratch.shape[1] - 1
        for q in range(t, n_par + 1, nt):
            partial[blk, q] = 0.0
        for r0 in range(blk * nt, n, nt * cuda.gridDim.x):
            r = r0 + t
            if r < n:
                mine = scratch[blk, :, t]
                row_forward(X[r], params, lay, n_layers, activation, mine)
                mine[loss_at] = head_delta(mine, z0, k, y2, r, head)
                row_backward(params, lay, n_layers, activation, mine)
            cuda.syncthreads()
            m = nt if n - r0 > nt else n - r0
            for q in range(t, n_par + 1, nt):
                partial[blk, q] += tile_sum(X, r0, m, lay, n_layers, scratch, blk, q)
            cuda.syncthreads()

    @cuda.jit
    def forward_rows(X, params, lay, n_layers, activation, head, scratch, out):
        """out[r] = model output of row r; hidden activations live in the block's scratch."""
        t, nt, blk = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
        k, z0 = lay[_SIZES, n_layers], lay[_D_OFF, n_layers]
        for r in range(blk * nt + t, X.shape[0], nt * cuda.gridDim.x):
            mine = scratch[blk, :, t]
            row_forward(X[r], params, lay, n_layers, activation, mine)
            head_output(mine, z0, k, head, out[r])

    @cuda.jit
    def sum_partials(partial, result):
        """result[q] = sum over blocks b = 0, 1, ... of partial[b, q]: a fixed, serial order."""
        q = cuda.grid(1)
        if q < result.shape[0]:
            s = 0.0
            for b in range(partial.shape[0]):
                s += partial[b, q]
            result[q] = s

    @cuda.jit
    def take_rows(X, y2, rows, xb, yb):
        """xb[i] = X[rows[i]], yb[i] = y2[rows[i]]: one thread per element, so the threads of a
        warp read consecutive elements of a row (coalesced)."""
        d, k = X.shape[1], y2.shape[1]
        width = d + k
        t = cuda.grid(1)
        step = cuda.gridsize(1)
        while t < rows.shape[0] * width:
            i = t // width
            j = t - i * width
            r = rows[i]
            if j < d:
                xb[i, j] = X[r, j]
            else:
                yb[i, j - d] = y2[r, j - d]
            t += step

    return SimpleNamespace(
        # device functions, shared with the tensor-parallel slices (``cuda_tensor``)
        activate=activate,
        slope=slope,
        head_delta=head_delta,
        head_output=head_output,
        # kernels
        take_rows=take_rows,
        grad_glm1=grad_glm1,
        grad_glmk=grad_glmk,
        grad_mlp=grad_mlp,
        forward_rows=forward_rows,
        sum_partials=sum_partials,
    )

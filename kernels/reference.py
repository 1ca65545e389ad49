"""Reference backend of the dense-stack contract in ``lepton_hpc.kernels``: plain ``@njit`` code.

One row at a time, in order, written to be read: forward through every layer, the head's loss
and d loss / d logits, back-propagation, and the row's gradient added into one float64
accumulator. No hand-written LLVM, no fast-math flags, no threads: ``math.exp``/``math.log``
from libm and float64 arithmetic throughout (float32 X is widened as it is read).

It is the oracle the tuned kernels (``cpu``) are tested against, and the CPU backend's fallback
wherever those are not proven to work (``native.supported()`` is false).
"""

import math

import numpy as np
from numba import njit

from . import BINARY, SIGMOID, SOFTMAX, SQUARED, TANH
from .checks import check_gradient_out, check_model, targets


@njit(cache=True)
def _offsets(sizes):
    """Where each layer's W starts in the flat parameters, and each layer's values in a row."""
    n_layers = sizes.size - 1
    p_off = np.zeros(n_layers + 1, np.int64)
    a_off = np.zeros(n_layers + 2, np.int64)
    for layer in range(n_layers):
        p_off[layer + 1] = p_off[layer] + (sizes[layer] + 1) * sizes[layer + 1]
    for layer in range(n_layers + 1):
        a_off[layer + 1] = a_off[layer] + sizes[layer]
    return p_off, a_off


@njit(cache=True)
def _sigmoid(z):
    """1 / (1 + e^-z) without overflow for either sign of z."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@njit(cache=True)
def _activate(z, activation):
    if activation == SIGMOID:
        return _sigmoid(z)
    if activation == TANH:
        return math.tanh(z)
    return z if z > 0.0 else 0.0


@njit(cache=True)
def _slope(a, activation):
    """d activation / dz, written with the activation's output a."""
    if activation == SIGMOID:
        return a * (1.0 - a)
    if activation == TANH:
        return 1.0 - a * a
    return 1.0 if a > 0.0 else 0.0


@njit(cache=True)
def _row_forward(x, params, sizes, p_off, a_off, activation, values):
    """values[a_off[l] : a_off[l + 1]] = layer l's input (l = 0: x); the last slot holds logits."""
    for j in range(sizes[0]):
        values[j] = x[j]
    last = sizes.size - 2
    for layer in range(last + 1):
        n_in, n_out, p0 = sizes[layer], sizes[layer + 1], p_off[layer]
        src, dst = a_off[layer], a_off[layer + 1]
        for o in range(n_out):
            s = params[p0 + n_in * n_out + o]  # the bias
            for j in range(n_in):
                s += values[src + j] * params[p0 + j * n_out + o]
            values[dst + o] = s if layer == last else _activate(s, activation)


@njit(cache=True)
def _head(values, z0, k, y, head, delta):
    """The row's loss from its logits values[z0 : z0 + k]; delta[:k] = d loss / d logits."""
    if head == SQUARED:
        loss = 0.0
        for o in range(k):
            r = values[z0 + o] - y[o]
            loss += r * r
            delta[o] = 2.0 * r
        return loss
    if head == BINARY:  # log(1 + e^z) - y z, written so that nothing overflows
        z, t = values[z0], y[0]
        loss = max(z, 0.0) - t * z + math.log1p(math.exp(-abs(z)))
        delta[0] = _sigmoid(z) - t
        return loss
    # SOFTMAX: cross-entropy after subtracting the row's maximum; a label outside 0..k-1 gives NaN
    cls = int(y[0])
    mx, s = _softmax(values, z0, k, delta)
    for o in range(k):
        delta[o] -= 1.0 if o == cls else 0.0
    picked = values[z0 + cls] if 0 <= cls < k else np.nan
    return mx + math.log(s) - picked


@njit(cache=True)
def _softmax(values, z0, k, dst):
    """dst[:k] = softmax of the logits values[z0:z0+k] (their maximum subtracted first);
    returns (maximum, sum of exponentials) for the cross-entropy."""
    mx = values[z0]
    for o in range(1, k):
        mx = max(mx, values[z0 + o])
    s = 0.0
    for o in range(k):
        dst[o] = math.exp(values[z0 + o] - mx)
        s += dst[o]
    for o in range(k):
        dst[o] /= s
    return mx, s


@njit(cache=True)
def _output(values, z0, k, head, dst):
    """dst[:k] = the model output from the logits: value, P(class 1) or class probabilities."""
    if head == BINARY:
        dst[0] = _sigmoid(values[z0])
    elif head == SOFTMAX:
        _softmax(values, z0, k, dst)
    else:
        for o in range(k):
            dst[o] = values[z0 + o]


@njit(cache=True)
def _gradient(X, Y, params, sizes, activation, head, out):
    """out[:P] = sum of the rows' gradients, out[P] = sum of their losses (rows in order)."""
    n_layers = sizes.size - 1
    P = params.size
    p_off, a_off = _offsets(sizes)
    values = np.empty(a_off[-1])
    delta = np.empty(sizes.max())
    below = np.empty(sizes.max())
    grad = np.zeros(P)
    loss = 0.0
    k = sizes[n_layers]
    for r in range(X.shape[0]):
        _row_forward(X[r], params, sizes, p_off, a_off, activation, values)
        loss += _head(values, a_off[n_layers], k, Y[r], head, delta)
        for layer in range(n_layers - 1, -1, -1):  # delta: d loss / d (this layer's output)
            n_in, n_out, p0 = sizes[layer], sizes[layer + 1], p_off[layer]
            src = a_off[layer]
            for j in range(n_in):
                for o in range(n_out):
                    grad[p0 + j * n_out + o] += values[src + j] * delta[o]
            for o in range(n_out):
                grad[p0 + n_in * n_out + o] += delta[o]
            if layer > 0:
                for j in range(n_in):
                    s = 0.0
                    for o in range(n_out):
                        s += params[p0 + j * n_out + o] * delta[o]
                    below[j] = s * _slope(values[src + j], activation)
                delta, below = below, delta
    out[:P] = grad
    out[P] = loss


@njit(cache=True)
def _forward(X, params, sizes, activation, head, out):
    n_layers = sizes.size - 1
    p_off, a_off = _offsets(sizes)
    values = np.empty(a_off[-1])
    for r in range(X.shape[0]):
        _row_forward(X[r], params, sizes, p_off, a_off, activation, values)
        _output(values, a_off[n_layers], sizes[n_layers], head, out[r])


def gradient(X, y, params, sizes, activation: int, head: int, out: np.ndarray) -> None:
    """out[:P] = sum of per-row loss gradients, out[P] = sum of losses, out[P+1] = n."""
    X, params, sizes = check_model(X, params, sizes, activation, head)
    check_gradient_out(out, params.size)
    n = X.shape[0]
    if n == 0:
        out[:] = 0.0
        return
    _gradient(X, targets(y, n, int(sizes[-1]), head), params, sizes, activation, head, out)
    out[params.size + 1] = n


def forward(X, params, sizes, activation: int, head: int, out: np.ndarray) -> None:
    """out (n, k) float64 = model output: value, P(class 1), or class probabilities."""
    X, params, sizes = check_model(X, params, sizes, activation, head)
    n, k = X.shape[0], int(sizes[-1])
    if out.shape != (n, k) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of shape ({n}, {k})")
    if n:
        _forward(X, params, sizes, activation, head, out)


def loss_sum(X, y, params, sizes, activation: int, head: int) -> float:
    """Sum over rows of the loss (runs the gradient; the reference favours one code path)."""
    params = np.ascontiguousarray(params, dtype=np.float64)
    out = np.empty(params.size + 2)
    gradient(X, y, params, sizes, activation, head, out)
    return float(out[params.size])

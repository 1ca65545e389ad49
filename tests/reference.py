"""Float64 NumPy references on the whole data set: what kernels and metrics are checked against."""

from __future__ import annotations

import itertools

import numpy as np


def unpack(params: np.ndarray, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    layers, at = [], 0
    for a, b in itertools.pairwise(sizes):
        W = params[at : at + a * b].reshape(a, b)
        layers.append((W, params[at + a * b : at + a * b + b]))
        at += a * b + b
    return layers


def _act(z: np.ndarray, activation: int) -> np.ndarray:
    if activation == 0:
        return 1.0 / (1.0 + np.exp(-z))
    if activation == 1:
        return np.tanh(z)
    return np.maximum(z, 0.0)


def _act_grad(z: np.ndarray, a: np.ndarray, activation: int) -> np.ndarray:
    if activation == 0:
        return a * (1.0 - a)
    if activation == 1:
        return 1.0 - a * a
    return (z > 0).astype(np.float64)


def forward(X, params, sizes, activation, head):
    """Outputs and the per-layer (pre-activation, activation) cache."""
    a = np.asarray(X, dtype=np.float64)
    cache = [(None, a)]
    layers = unpack(params, sizes)
    for i, (W, b) in enumerate(layers):
        z = a @ W + b
        last = i == len(layers) - 1
        if not last:
            a = _act(z, activation)
        elif head == 1:
            a = 1.0 / (1.0 + np.exp(-z))
        elif head == 2:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            a = e / e.sum(axis=1, keepdims=True)
        else:
            a = z
        cache.append((z, a))
    return a, cache


def loss_rows(out, z_last, y, head):
    if head == 0:
        yy = y.reshape(out.shape) if y.ndim == out.ndim else y[:, None]
        return ((out - yy) ** 2).sum(axis=1)
    if head == 1:
        z = z_last[:, 0]
        return np.logaddexp(0.0, z) - y * z
    m = z_last.max(axis=1)
    lse = m + np.log(np.exp(z_last - m[:, None]).sum(axis=1))
    return lse - z_last[np.arange(len(y)), y.astype(int)]


def gradient(X, y, params, sizes, activation, head):
    """(gradient sum, loss sum, rows) in float64 on all of X."""
    y = np.asarray(y, dtype=np.float64)
    out, cache = forward(X, params, sizes, activation, head)
    loss = loss_rows(out, cache[-1][0], y, head).sum()
    if head == 0:
        yy = y.reshape(out.shape) if y.ndim == out.ndim else y[:, None]
        delta = 2.0 * (out - yy)
    elif head == 1:
        delta = out - y[:, None]
    else:
        delta = out.copy()
        delta[np.arange(len(y)), y.astype(int)] -= 1.0
    layers = unpack(params, sizes)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        a_prev = cache[i][1]
        grads.append((a_prev.T @ delta, delta.sum(axis=0)))
        if i > 0:
            z, a = cache[i]
            delta = (delta @ layers[i][0].T) * _act_grad(z, a, activation)
    flat = np.concatenate([np.concatenate([gw.ravel(), gb]) for gw, gb in reversed(grads)])
    return flat, float(loss), X.shape[0]

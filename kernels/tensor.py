"""Tensor-parallel MLP slices (Megatron-LM's MLP split): the plan and the Numba kernels.

Hidden layers are taken in pairs (0, 1), (2, 3), ...: the first layer of a pair is
column-parallel (rank t of k holds output units ``t*w .. (t+1)*w`` of it, w = width / k: those
columns of W and that slice of b), the second row-parallel (rank t holds the same slice of its
input units: those rows of W, and the whole bias). Forward, a pair costs one sum of the partial
products of the row-parallel layer over the k ranks (``allreduce``); backward, one sum of the
partial products of the column-parallel layer (none for the first pair: X needs no gradient).
Activations inside a pair stay local. An odd last layer (the head after an even number of
hidden layers) is replicated: every rank holds it whole.

A rank's parameters are one flat float64 vector, layer by layer ``[W piece (row-major), b
piece]``; ``TensorPlan.own`` gives for each of its entries the position in the model's full
flat vector (the layout of ``lepton_hpc.kernels``), so slices of the parameters and of the
optimiser state are ``full[own]`` and the full vector is rebuilt by ``full[own_t] = local_t``.

Kernels take plain arrays and one callable, ``allreduce(buf)``, that sums a float64 buffer in
place over the tensor group (the identity for k = 1); no MPI here. Every product and sum is
float64: the dense products are BLAS GEMMs (float32 X is widened first), activations and heads
the reference's (libm, Numba), so the result matches the data-parallel gradient to rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from .checks import targets
from .cpu_gemm import blas_threads
from .reference import _activate, _head, _output, _slope

COLUMN, ROW, REPLICATED = "column", "row", "replicated"


@dataclass(frozen=True)
class SliceLayer:
    """One layer on one rank: its kind, local W shape (n_in x n_out), offsets in the local
    vector (W at ``w0``, bias at ``b0``, ``nb`` values)."""

    kind: str
    n_in: int
    n_out: int
    w0: int
    b0: int
    nb: int


@dataclass(frozen=True)
class TensorPlan:
    """Rank ``t`` of ``k``'s slice of the MLP ``sizes``: its layers and ``own`` (see module)."""

    sizes: tuple[int, ...]
    k: int
    t: int
    layers: tuple[SliceLayer, ...]
    own: np.ndarray  # int64: full-vector position of each local entry

    @property
    def n_local(self) -> int:
        return int(self.own.size)


def split_widths(sizes) -> list[int]:
    """The widths the split cuts (the outputs of the pairs' column-parallel layers)."""
    n_layers = len(sizes) - 1
    return [int(sizes[layer + 1]) for layer in range(0, n_layers - 1, 2)]


def layer_kinds(n_layers: int) -> list[str]:
    kinds = []
    for layer in range(n_layers):
        if layer % 2 == 0:
            kinds.append(COLUMN if layer + 1 < n_layers else REPLICATED)
        else:
            kinds.append(ROW)
    return kinds


def make_plan(sizes, k: int, t: int) -> TensorPlan:
    """The slices rank ``t`` of a tensor group of ``k`` holds; k must divide each split width."""
    sizes = tuple(int(s) for s in sizes)
    if not 0 <= t < k:
        raise ValueError(f"tensor index {t} not in 0..{k - 1}")
    for w in split_widths(sizes):
        if w % k:
            raise ValueError(f"width {w} is not divisible by {k}")
    layers, own, at, p0 = [], [], 0, 0
    for kind, (n_in, n_out) in zip(
        layer_kinds(len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        W = p0 + np.arange(n_in * n_out, dtype=np.int64).reshape(n_in, n_out)
        b = p0 + n_in * n_out + np.arange(n_out, dtype=np.int64)
        if kind == COLUMN:
            w = n_out // k
            W, b = W[:, t * w : (t + 1) * w], b[t * w : (t + 1) * w]
        elif kind == ROW:
            w = n_in // k
            W = W[t * w : (t + 1) * w, :]
        own += [W.ravel(), b]
        layers.append(SliceLayer(kind, W.shape[0], W.shape[1], at, at + W.size, b.size))
        at += W.size + b.size
        p0 += n_in * n_out + n_out
    return TensorPlan(sizes, k, t, tuple(layers), np.concatenate(own))


# ---- kernels -----------------------------------------------------------------------------------
# The dense products are float64 GEMMs (NumPy's BLAS: 60-70 GFLOP/s a core here on 256-wide
# products against 5-6 for a Numba loop nest on these slices; float32 rows are widened first),
# run on the rank's kernel threads.
def _limit_blas() -> None:
    """BLAS uses as many threads as the Numba kernels (``train.threads``), so that ranks x
    threads does not oversubscribe the node."""
    blas_threads(numba.get_num_threads())


def _wide(a):
    return a if a.dtype == np.float64 else a.astype(np.float64)


def dense(src, W, b, dst):
    """dst = src @ W (+ b when b has any values)."""
    np.matmul(_wide(src), W, out=dst)
    if b.size:
        dst += b


def accumulate(src, delta, gW, gb):
    """gW += src^T delta, gb += column sums of delta."""
    gW += _wide(src).T @ delta
    gb += delta.sum(axis=0)


def backprop(delta, W, out):
    """out = delta @ W^T: d loss / d (the layer's inputs), before the activation's slope."""
    np.matmul(delta, W.T, out=out)


@njit(parallel=True, cache=True)
def activate(z, activation):
    """The hidden activation in place."""
    for i in prange(z.shape[0]):
        for o in range(z.shape[1]):
            z[i, o] = _activate(z[i, o], activation)


@njit(parallel=True, cache=True)
def head_loss(z, y, head, delta):
    """Sum of the rows' losses from their logits z (m x k); delta = d loss / d z."""
    m, k = z.shape
    losses = np.empty(m)
    for i in prange(m):
        losses[i] = _head(z[i], 0, k, y[i], head, delta[i])
    total = 0.0
    for i in range(m):  # in row order
        total += losses[i]
    return total


@njit(parallel=True, cache=True)
def apply_slope(out, act, activation):
    """out *= act'(.), the slope written with the activation's outputs ``act``."""
    for i in prange(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] *= _slope(act[i, j], activation)


# ---- one rank's passes -----------------------------------------------------------------------
def _pieces(local, plan):
    return [
        (local[L.w0 : L.w0 + L.n_in * L.n_out].reshape(L.n_in, L.n_out), local[L.b0 : L.b0 + L.nb])
        for L in plan.layers
    ]


def _rows(X):
    if X.dtype not in (np.float32, np.float64) or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float64)
    return X


def _forward(X, pieces, plan, activation, allreduce, flag):
    """Each layer's input and the logits (the last entry) of the rows of X; ``flag`` rides in
    the first forward sum and comes back summed over the group."""
    m = X.shape[0]
    last = len(plan.layers) - 1
    acts, a, carried = [X], X, False
    for index, (L, (W, b)) in enumerate(zip(plan.layers, pieces, strict=True)):
        if L.kind == ROW:  # partial products, summed over the group, then the bias once
            buf = np.empty(m * L.n_out + (0 if carried else 1))
            z = buf[: m * L.n_out].reshape(m, L.n_out)
            dense(a, W, b[:0], z)
            if not carried:
                buf[-1] = flag
            allreduce(buf)
            if not carried:
                flag, carried = float(buf[-1]), True
            z += b
        else:
            z = np.empty((m, L.n_out))
            dense(a, W, b, z)
        if index < last:
            activate(z, activation)
        acts.append(z)
        a = z
    return acts, flag if carried else agree_flag(flag, allreduce)


def agree_flag(flag: float, allreduce) -> float:
    """The flag summed over the tensor group, when no row-parallel layer's sum carried it."""
    buf = np.array([flag])
    allreduce(buf)
    return float(buf[0])


@njit(cache=True)
def _outputs(z, head, out):
    for i in range(z.shape[0]):
        _output(z[i], 0, z.shape[1], head, out[i])


def sliced_forward(
    X, local: np.ndarray, plan: TensorPlan, activation: int, head: int, out, allreduce
):
    """out (n x k float64) = the model's outputs on the rows of X (value, P(class 1) or class
    probabilities, as ``forward``); every rank of the tensor group calls it on the same rows."""
    X = _rows(X)
    _limit_blas()
    acts, _ = _forward(X, _pieces(local, plan), plan, activation, allreduce, 0.0)
    _outputs(acts[-1], head, out)


def sliced_gradient(
    X, y, local: np.ndarray, plan: TensorPlan, activation: int, head: int, out, allreduce, flag=0.0
) -> float:
    """out[:n_local] = this rank's slice of the summed gradient over the rows of X,
    out[n_local] = the loss sum, out[n_local + 1] = the rows (the ``gradient`` contract, on the
    slice). Every rank of the tensor group calls it on the same rows. ``flag`` rides in the
    first forward sum; returns its sum over the group (the stop flag every rank agrees on)."""
    X = _rows(X)
    _limit_blas()
    m, n, k_out = X.shape[0], plan.n_local, plan.sizes[-1]
    Y = targets(y, m, k_out, head)
    pieces = _pieces(local, plan)
    acts, flag = _forward(X, pieces, plan, activation, allreduce, flag)
    grad = out[:n]
    grad[:] = 0.0
    delta = np.empty((m, k_out))
    out[n] = head_loss(acts[-1], Y, head, delta) if m else 0.0
    out[n + 1] = m
    for index in range(len(plan.layers) - 1, -1, -1):
        L = plan.layers[index]
        W, _ = pieces[index]
        gW = grad[L.w0 : L.w0 + L.n_in * L.n_out].reshape(L.n_in, L.n_out)
        accumulate(acts[index], delta, gW, grad[L.b0 : L.b0 + L.nb])
        if index == 0:
            break
        below = np.empty((m, L.n_in))
        backprop(delta, W, below)
        if L.kind == COLUMN:  # partial sums over the group's slices of this layer's outputs
            allreduce(below.reshape(-1))
        apply_slope(below, acts[index], activation)
        delta = below
    return flag

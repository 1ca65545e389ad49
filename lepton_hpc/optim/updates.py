"""The optimisers' element-wise updates as one fused pass over the parameters (Numba).

Each writes the same bits as the NumPy expressions in ``lepton_hpc.optim`` (same operations
in the same order per element, no fast-math: no contraction into FMAs), without their
temporaries: for a model of P parameters NumPy's Adam allocates eight P-length arrays a step
(1.3 s a step at P = 18M here, against 0.08 s for this pass). Large models run the pass on the
rank's threads (``prange``; elements are independent, so the bits do not depend on the thread
count). Under ``PARALLEL_MIN`` parameters it runs on the calling thread: the whole pass then
takes well under a microsecond, and waking the other threads costs more (1.7 us with one
thread, 2 us and up with two, and tens of microseconds when another process holds the other
core: every mini-batch step of a small model pays it). Same operations, same bits.

The passes take the gradient as the trainer has it, summed over the batch's rows: each element
is ``sums[i] / rows``, plus ``l2[i] * params[i]`` where ``l2`` (the L2 coefficient of each
parameter) is not empty, the bits of NumPy's ``sums / rows + l2 * params``. The mean is then
no pass and no array of its own (it was 60 us of a 1.5 ms mini-batch step of a 131,841-parameter
MLP here). A gradient that is already a mean is divided by 1.0, which changes no bit.

Where ``rows`` is a power of two (a batch of 256 or 4,096 rows, a mean's 1.0), ``sums[i] / rows``
is computed as ``sums[i] * (1 / rows)``: that reciprocal is exact, and both operations round the
same real number once, so the bits are the same (subnormal results included), without the
division, the slowest instruction of the pass.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import njit, prange

PARALLEL_MIN = 1 << 15  # parameters from which the update runs on the rank's threads
# NumPy's error model: a division by zero gives inf or nan instead of raising, so no branch per
# element and LLVM vectorises the loops (Adam on 18,593 parameters: 119 against 29 us, the
# same bits). The divisors are never zero: c1 > 0 (beta1 < 1) and sqrt(v / c2) + eps > 0
# (eps > 0, both checked by the configuration); a NaN gradient gives NaN either way.
_JIT = {"cache": True, "error_model": "numpy"}


@njit(inline="always", error_model="numpy")
def _reciprocal(rows):
    """1 / rows where that is exact (rows a power of two whose reciprocal is a normal number),
    else 0.0: the passes then divide."""
    mantissa, exponent = math.frexp(rows)
    return 1.0 / rows if mantissa == 0.5 and -1020 < exponent < 1020 else 0.0


@njit(inline="always", error_model="numpy")
def _sgd_at(i, g, params, l2, decay, lr):
    if decay:
        g += l2[i] * params[i]
    params[i] -= lr * g


def _sgd(params, sums, rows, l2, lr):
    """The gradient is ``sums / rows``, plus ``l2 * params`` where ``l2`` is not empty."""
    decay = l2.size > 0
    inverse = _reciprocal(rows)
    if inverse != 0.0:
        for i in prange(params.size):
            _sgd_at(i, sums[i] * inverse, params, l2, decay, lr)
    else:
        for i in prange(params.size):
            _sgd_at(i, sums[i] / rows, params, l2, decay, lr)


@njit(inline="always", error_model="numpy")
def _momentum_at(i, g, params, l2, decay, v, mu, lr):
    if decay:
        g += l2[i] * params[i]
    vi = v[i] * mu
    vi += g
    v[i] = vi
    params[i] -= lr * vi


def _momentum(params, sums, rows, l2, v, mu, lr):
    decay = l2.size > 0
    inverse = _reciprocal(rows)
    if inverse != 0.0:
        for i in prange(params.size):
            _momentum_at(i, sums[i] * inverse, params, l2, decay, v, mu, lr)
    else:
        for i in prange(params.size):
            _momentum_at(i, sums[i] / rows, params, l2, decay, v, mu, lr)


@njit(inline="always", error_model="numpy")
def _adam_at(i, g, params, l2, decay, m, v, b1, b2, c1, c2, lr, eps):
    if decay:
        g += l2[i] * params[i]
    mi = m[i] * b1
    mi += (1.0 - b1) * g
    vi = v[i] * b2
    vi += (1.0 - b2) * g * g
    m[i] = mi
    v[i] = vi
    params[i] -= lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


def _adam(params, sums, rows, l2, m, v, b1, b2, c1, c2, lr, eps):
    """c1 = 1 - b1**t, c2 = 1 - b2**t (the bias corrections)."""
    decay = l2.size > 0
    inverse = _reciprocal(rows)
    if inverse != 0.0:
        for i in prange(params.size):
            _adam_at(i, sums[i] * inverse, params, l2, decay, m, v, b1, b2, c1, c2, lr, eps)
    else:
        for i in prange(params.size):
            _adam_at(i, sums[i] / rows, params, l2, decay, m, v, b1, b2, c1, c2, lr, eps)


def _pair(fn):
    """(on the calling thread, on the rank's threads): one source, two compiled kernels
    (``prange`` is ``range`` where the function is not parallel). The threaded one is a copy
    under a name of its own: Numba's on-disk cache keys a kernel by its qualified name and
    signature, not by its options, so under one name the two would load each other's code."""
    threaded = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_threads")
    threaded.__qualname__ = fn.__qualname__ + "_threads"
    threaded.__doc__ = fn.__doc__
    return njit(**_JIT)(fn), njit(parallel=True, **_JIT)(threaded)


_SGD, _MOMENTUM, _ADAM = _pair(_sgd), _pair(_momentum), _pair(_adam)


NO_L2 = np.zeros(0)


def sgd(params, sums, rows, l2, lr):
    """``params -= lr * g``, g = sums / rows (+ l2 * params): see the module docstring."""
    _SGD[params.size >= PARALLEL_MIN](params, sums, rows, l2, lr)


def momentum(params, sums, rows, l2, v, mu, lr):
    _MOMENTUM[params.size >= PARALLEL_MIN](params, sums, rows, l2, v, mu, lr)


def adam(params, sums, rows, l2, m, v, b1, b2, c1, c2, lr, eps):
    """c1 = 1 - b1**t, c2 = 1 - b2**t (the bias corrections)."""
    _ADAM[params.size >= PARALLEL_MIN](params, sums, rows, l2, m, v, b1, b2, c1, c2, lr, eps)

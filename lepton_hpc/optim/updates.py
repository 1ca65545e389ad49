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
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

PARALLEL_MIN = 1 << 15  # parameters from which the update runs on the rank's threads
# NumPy's error model: a division by zero gives inf or nan instead of raising, so no branch per
# element and LLVM vectorises the loops (Adam on 18,593 parameters: 119 against 29 us, the
# same bits). The divisors are never zero: c1 > 0 (beta1 < 1) and sqrt(v / c2) + eps > 0
# (eps > 0, both checked by the configuration); a NaN gradient gives NaN either way.
_JIT = {"cache": True, "error_model": "numpy"}


def _sgd(params, grad, lr):
    for i in prange(params.size):
        params[i] -= lr * grad[i]


def _momentum(params, grad, v, mu, lr):
    for i in prange(params.size):
        vi = v[i] * mu
        vi += grad[i]
        v[i] = vi
        params[i] -= lr * vi


def _adam(params, grad, m, v, b1, b2, c1, c2, lr, eps):
    """c1 = 1 - b1**t, c2 = 1 - b2**t (the bias corrections)."""
    for i in prange(params.size):
        g = grad[i]
        mi = m[i] * b1
        mi += (1.0 - b1) * g
        vi = v[i] * b2
        vi += (1.0 - b2) * g * g
        m[i] = mi
        v[i] = vi
        params[i] -= lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


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


def sgd(params, grad, lr):
    _SGD[params.size >= PARALLEL_MIN](params, grad, lr)


def momentum(params, grad, v, mu, lr):
    _MOMENTUM[params.size >= PARALLEL_MIN](params, grad, v, mu, lr)


def adam(params, grad, m, v, b1, b2, c1, c2, lr, eps):
    """c1 = 1 - b1**t, c2 = 1 - b2**t (the bias corrections)."""
    _ADAM[params.size >= PARALLEL_MIN](params, grad, m, v, b1, b2, c1, c2, lr, eps)

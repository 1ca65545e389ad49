"""Numba kernels on plain arrays: no config, no I/O, no MPI (shipped as ``lepton_hpc.kernels``).

Backends: ``reference`` (plain ``@njit``, the oracle), ``cpu`` (tuned, multithreaded; runs
``reference`` where ``native.supported()`` is false) and ``cuda``. Hand-written LLVM code lives
only in ``native``. The contract every backend keeps, so the engine can swap them:

Every model is a stack of dense layers described by ``sizes = (d, h1, ..., k)`` (int64 array).
Parameters live in ONE flat float64 vector; for each layer ``l`` it holds ``W_l`` (``sizes[l]`` x
``sizes[l+1]``, row-major) followed by ``b_l`` (``sizes[l+1]``). Linear and logistic regression are
``sizes = (d, 1)``, so their layout is ``[w_0 .. w_{d-1}, b]``; softmax is ``(d, k)``.

Codes (small ints so that Numba and CUDA can take them):
    activation: SIGMOID=0, TANH=1, RELU=2        (hidden layers only)
    head:       SQUARED=0 (regression, per-row loss sum_j (out_j - y_j)^2, i.e. MSE per output)
                BINARY=1  (sigmoid output, log-loss; y in {0, 1})
                SOFTMAX=2 (softmax output, cross-entropy; y holds class ids 0..k-1)

``gradient(X, y, params, sizes, activation, head, out)``
    X: (n, d) float32 or float64, C-contiguous; y: (n,) or (n, k) for multi-output regression.
    out: float64 of length P + 2 (P = len(params)); overwritten with
        out[:P]  = sum over rows of d(loss_i)/d(params)
        out[P]   = sum over rows of loss_i
        out[P+1] = n (row count)
    Sums, not means: after one allreduce of ``out`` the global mean is out[:P] / out[P+1] exactly,
    whatever the split of rows between ranks. Accumulation is float64.

``forward(X, params, sizes, activation, head, out)``
    out: (n, k) float64; the model output: value (SQUARED), probability of class 1 (BINARY),
    class probabilities (SOFTMAX).
"""

import functools
import itertools

from .. import OMP_SPINCOUNT  # noqa: F401 - set on the package's import (see there)
from ..kernel_cache import install as _install_cache_locator

SIGMOID, TANH, RELU = 0, 1, 2
SQUARED, BINARY, SOFTMAX = 0, 1, 2

ACTIVATIONS = {"sigmoid": SIGMOID, "tanh": TANH, "relu": RELU}
HEADS = {"squared": SQUARED, "binary": BINARY, "softmax": SOFTMAX}


def param_count(sizes) -> int:
    """Length of the flat parameter vector for layer widths ``sizes``."""
    return _param_count(tuple(int(s) for s in sizes))


@functools.lru_cache(maxsize=64)
def _param_count(sizes: tuple[int, ...]) -> int:  # once per model: this runs every step
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


_install_cache_locator()  # before any kernel is decorated: a read-only install's cache is used

"""Numba kernels of ``metrics.MetricSums``: one parallel pass over a piece's targets and outputs
that counts the confusion matrix and bins the per-row loss terms exactly (``exact``'s bins).

Each thread fills the counts and bins of its own run of rows; the runs' int64 counts and bins
are then added, and integer addition is exact, so the result is the same for any thread count
and any split into pieces: the bits of the NumPy expression it replaces, summed by ``_bin``.
The per-row terms: for a binary head -log(p) for label 1 and -log1p(-p) for label 0, p
clipped to [EPS, 1 - EPS]; for a softmax head -log of the true class's probability clipped
below at EPS, the argmax's first maximum as the prediction; for a squared head err², |err| and
(y - mean)² per output. The logs are ``kernels.fastmath``'s (vectorised, relative error below
1e-14 against NumPy's), so log-loss agrees with a NumPy evaluation to about 1e-14.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .exact import WIDTH, _bin
from .kernel_cache import install as _install_cache_locator
from .kernels.cpu_tiles import _row_tiles, outputs8
from .kernels.fastmath import _FLAGS, _log_m, fast_log
from .kernels.native.simd import splat8, store8

_install_cache_locator()  # before the kernels below are decorated

EPS = float(np.finfo(np.float64).eps)  # probabilities clipped to [EPS, 1 - EPS], as scikit-learn
MIN_RUN = 4096  # rows per thread at least: a small piece runs on fewer threads
STEP = 256  # rows whose terms are made, then binned
LOG1P_SERIES = 0.29  # q / (2 - q) <= 0.1696: within the atanh series' range (0.1716)


@njit(cache=True)
def _runs(n: int, threads: int) -> int:
    return max(1, min(threads, n // MIN_RUN))


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _nll_binary(p, label):
    """-log(p) (label 1) or -log1p(-p) (label 0), p clipped to [EPS, 1 - EPS]; NaN stays."""
    q = min(max(p, EPS), 1.0 - EPS)
    small = q <= LOG1P_SERIES  # log(1 - q) = 2 atanh(-q / (2 - q)) where the series holds
    s = -q / (2.0 - q)
    lo = _log_m(s if small else 0.0)
    hi = fast_log(q if label == 1 else 1.0 - q)  # 1 - q exact above the series' range
    term = -hi if label == 1 or not small else -lo
    return p if np.isnan(p) else term


@njit(parallel=True, error_model="numpy", cache=True)
def classification_sums(y, out, binary, k, cm, bins, threads) -> None:
    """Add the confusion counts (``cm``, k*k) and the binned log-loss terms (``bins``, WIDTH)
    of targets ``y`` (n,) and outputs ``out`` (n, k or 1)."""
    n = y.shape[0]
    runs = _runs(n, threads)
    cms = np.zeros((runs, cm.size), dtype=np.int64)
    rows = np.zeros((runs, WIDTH), dtype=np.int64)
    for r in prange(runs):
        terms = np.empty(STEP, dtype=np.float64)
        for a in range(r * n // runs, (r + 1) * n // runs, STEP):
            b = min((r + 1) * n // runs, a + STEP)
            if binary:
                for i in range(a, b):  # vectorised: the fast log has no calls
                    terms[i - a] = _nll_binary(out[i, 0], np.int64(y[i]))
                for i in range(a, b):
                    cms[r, np.int64(y[i]) * k + (1 if out[i, 0] >= 0.5 else 0)] += 1
            else:
                for i in range(a, b):
                    label = np.int64(y[i])
                    pred = 0
                    best = out[i, 0]
                    for j in range(1, out.shape[1]):
                        if out[i, j] > best:
                            best, pred = out[i, j], j
                    cms[r, label * k + pred] += 1
                    q = out[i, label]
                    terms[i - a] = q if np.isnan(q) else -fast_log(max(q, EPS))
            _bin(terms[: b - a], rows[r])
    for r in range(runs):
        cm += cms[r]
        bins += rows[r]


@njit(parallel=True, cache=True)
def regression_sums(y, out, mean, bins, threads) -> None:
    """Add the binned err², |err| and (y - mean)² of targets ``y`` (n, k) and outputs ``out``
    (n, k) to ``bins`` (3, WIDTH)."""
    n, k = out.shape
    runs = _runs(n, threads)
    parts = np.zeros((runs, 3, WIDTH), dtype=np.int64)
    for r in prange(runs):
        sq = np.empty(STEP * k, dtype=np.float64)
        ab = np.empty(STEP * k, dtype=np.float64)
        dv = np.empty(STEP * k, dtype=np.float64)
        for a in range(r * n // runs, (r + 1) * n // runs, STEP):
            b = min((r + 1) * n // runs, a + STEP)
            t = 0
            for i in range(a, b):
                for j in range(k):
                    err = out[i, j] - y[i, j]
                    sq[t] = err * err
                    ab[t] = abs(err)
                    dev = y[i, j] - mean[j]
                    dv[t] = dev * dev
                    t += 1
            _bin(sq[:t], parts[r, 0])
            _bin(ab[:t], parts[r, 1])
            _bin(dv[:t], parts[r, 2])
    for r in range(runs):
        bins += parts[r]


@njit(parallel=True, error_model="numpy", cache=True)
def binary_model_sums(X, y, w, ahead, cm, bins, threads) -> None:
    """``classification_sums`` of a one-output logistic model with d <= 32 on rows ``X``
    (targets ``y``), its probabilities computed eight rows at a time in the register tiles
    (``cpu_tiles.outputs8``, the forward pass's bits) and used at once, never stored: one pass
    over the rows instead of a forward pass, a float64 output array and a pass over it."""
    n, d = X.shape
    xf = X.reshape(-1)
    w0, w1, w2, w3 = _row_tiles(w, 0, d)
    bias = splat8(w[d])
    runs = _runs(n, threads)
    cms = np.zeros((runs, 4), dtype=np.int64)
    rows = np.zeros((runs, WIDTH), dtype=np.int64)
    for r in prange(runs):
        probs = np.empty(STEP, dtype=np.float64)
        terms = np.empty(STEP, dtype=np.float64)
        stop = (r + 1) * n // runs
        for a in range(r * n // runs, stop, STEP):
            b = min(stop, a + STEP)
            for i in range(a, b, 8):  # the probabilities of a step of rows, eight at a time
                live = min(8, b - i)
                p8 = outputs8(X, xf, i, live, ahead, w0, w1, w2, w3, bias, True)
                store8(probs, i - a, live, p8)
            for i in range(a, b):  # vectorised: the fast log has no calls
                terms[i - a] = _nll_binary(probs[i - a], np.int64(y[i]))
            ones = predicted = both = 0  # label 1, predicted 1, both: counted in registers
            for i in range(a, b):  # (an increment of cms[r, label * 2 + predicted] a row is a
                one = y[i] == 1.0  # chain of loads and stores through one of four counters)
                positive = probs[i - a] >= 0.5
                ones += one
                predicted += positive
                both += one & positive
            cms[r, 3] += both
            cms[r, 2] += ones - both
            cms[r, 1] += predicted - both
            cms[r, 0] += (b - a) - ones - predicted + both
            _bin(terms[: b - a], rows[r])
    for r in range(runs):
        cm += cms[r]
        bins += rows[r]

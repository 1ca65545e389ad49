"""Sums of float64 values over all ranks that are exact, so they never depend on the rank count.

A float sum depends on the order of its additions: per-rank sums combined by an allreduce differ
in the last bits between 1, 2 and 3 ranks. Here every finite value x = M·2^E (M a 53-bit integer)
is binned by E and the integer mantissas are summed per bin, split in halves so that no integer
overflows; the int64 bins are allreduced (integer addition is associative) and the total is
rounded to float64 once. The result is the correctly rounded sum of all values, the same for any
split of the rows and any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .comm.base import Communicator

E_MIN = -1126  # exponent of the smallest subnormal written as M·2^E with a 53-bit M
N_BINS = 2098  # exponents E_MIN .. 971 (the largest finite double)
HALF = 26  # M = hi·2^26 + lo: |hi| < 2^27 and 0 <= lo < 2^26
PIECE = 1 << 22  # values binned at a time (bounds the temporaries)
WIDTH = 2 * N_BINS + 3  # per column: hi bins, lo bins, count of NaN, +inf, -inf


def _bin(values: np.ndarray, row: np.ndarray) -> None:
    """Add the finite ``values`` to the integer bins in ``row`` (and count the others)."""
    flat = np.ravel(values).astype(np.float64, copy=False)
    for at in range(0, flat.size, PIECE):
        v = flat[at : at + PIECE]
        finite = np.isfinite(v)
        if not finite.all():
            row[-3] += int(np.isnan(v).sum())
            row[-2] += int(np.isposinf(v).sum())
            row[-1] += int(np.isneginf(v).sum())
            v = v[finite]
        m, e = np.frexp(v)
        mant = (m * 2.0**53).astype(np.int64)  # exact: |m| in [0.5, 1)
        b = e.astype(np.int64) - 53 - E_MIN
        hi = mant >> HALF
        lo = mant - (hi << HALF)
        np.add.at(row, b, hi)  # int64 bins: exact up to 2^36 values
        np.add.at(row, b + N_BINS, lo)


def _round(row: np.ndarray) -> float:
    """The correctly rounded float64 value of one column's global bins."""
    nan, pos, neg = (int(c) for c in row[-3:])
    if nan or (pos and neg):
        return float("nan")
    if pos or neg:
        return float("inf") if pos else float("-inf")
    hi, lo = row[:N_BINS], row[N_BINS : 2 * N_BINS]
    total = 0
    for b in np.flatnonzero((hi != 0) | (lo != 0)):
        total += ((int(hi[b]) << HALF) + int(lo[b])) << int(b)
    try:
        return total / (1 << -E_MIN)  # int / int is correctly rounded in Python
    except OverflowError:
        return float("inf") if total > 0 else float("-inf")


def exact_sums(columns: Sequence[np.ndarray], comm: Communicator) -> np.ndarray:
    """The exact global sum of each array in ``columns`` (all its elements) over every rank.

    One allreduce of int64 bins for all columns; the same bits for any rank count.
    """
    bins = np.zeros((len(columns), WIDTH), dtype=np.int64)
    for values, row in zip(columns, bins, strict=True):
        _bin(values, row)
    comm.allreduce_(bins.reshape(-1))
    return np.array([_round(row) for row in bins], dtype=np.float64)

"""Sums of float64 values over all ranks that are exact, so they never depend on the rank count.

A float sum depends on the order of its additions: per-rank sums combined by an allreduce differ
in the last bits between 1, 2 and 3 ranks. Here every finite value x = M·2^(e-1075) (M its 53-bit
integer mantissa, e its biased exponent) is binned by e and the integer mantissas are summed per
bin, split in halves so that no integer overflows; the int64 bins are allreduced (integer
addition is associative) and the total is rounded to float64 once. The result is the correctly
rounded sum of all values, the same for any split of the rows and any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from .comm.base import Communicator
from .kernel_cache import install as _install_cache_locator

_install_cache_locator()  # before the kernels below are decorated

N_BINS = 2047  # biased exponents 1..2046 (subnormals share bin 1); index 0 stays empty
HALF = 26  # M = hi·2^26 + lo: |hi| < 2^27 and 0 <= lo < 2^26, so 2^36 values fit in int64
NAN, POS_INF, NEG_INF = 2 * N_BINS, 2 * N_BINS + 1, 2 * N_BINS + 2
WIDTH = 2 * N_BINS + 3  # per column: hi bins, lo bins, counts of NaN, +inf, -inf
MANTISSA = (1 << 52) - 1
IMPLICIT = 1 << 52


@njit(cache=True)
def _bin(v: np.ndarray, row: np.ndarray) -> None:
    """Add each value of the contiguous float64 ``v`` to the int64 bins of ``row``."""
    bits = v.view(np.int64)
    for i in range(bits.size):
        b = bits[i]
        e = (b >> 52) & 0x7FF
        m = b & MANTISSA
        if e == 0x7FF:  # NaN or infinity: counted, never binned
            if m != 0:
                row[NAN] += 1
            elif b < 0:
                row[NEG_INF] += 1
            else:
                row[POS_INF] += 1
            continue
        if e == 0:  # subnormal: the same scale as the smallest normal, no implicit bit
            e = 1
        else:
            m |= IMPLICIT
        if b < 0:
            m = -m
        hi = m >> HALF
        row[e] += hi
        row[N_BINS + e] += m - (hi << HALF)


def _round(row: np.ndarray) -> float:
    """The correctly rounded float64 value of one column's global bins."""
    nan, pos, neg = (int(row[k]) for k in (NAN, POS_INF, NEG_INF))
    if nan or (pos and neg):
        return float("nan")
    if pos or neg:
        return float("inf") if pos else float("-inf")
    hi, lo = row[:N_BINS], row[N_BINS : 2 * N_BINS]
    total = 0  # the sum in units of 2^-1074, as a Python integer (exact)
    for e in np.flatnonzero((hi != 0) | (lo != 0)):
        total += ((int(hi[e]) << HALF) + int(lo[e])) << int(e - 1)
    try:
        return total / (1 << 1074)  # int / int is correctly rounded in Python
    except OverflowError:
        return float("inf") if total > 0 else float("-inf")


class ExactSums:
    """``exact_sums`` built up piece by piece: ``add`` the pieces of each column (in any order,
    on any rank), then ``total`` gives the same bits as one ``exact_sums`` of the whole columns
    (integer bins add associatively), for metrics over rows streamed from a file."""

    def __init__(self, n_columns: int) -> None:
        self.bins = np.zeros((n_columns, WIDTH), dtype=np.int64)

    def add(self, columns: Sequence[np.ndarray]) -> None:
        for values, row in zip(columns, self.bins, strict=True):
            _bin(np.ascontiguousarray(np.ravel(values), dtype=np.float64), row)

    def total(self, comm: Communicator) -> np.ndarray:
        """The global sums (one allreduce of the bins; collective)."""
        bins = self.bins.copy()
        comm.allreduce_(bins.reshape(-1))
        return np.array([_round(row) for row in bins], dtype=np.float64)


def exact_sums(columns: Sequence[np.ndarray], comm: Communicator) -> np.ndarray:
    """The exact global sum of each array in ``columns`` (all its elements) over every rank.

    One allreduce of int64 bins for all columns; the same bits for any rank count.
    """
    sums = ExactSums(len(columns))
    sums.add(columns)
    return sums.total(comm)

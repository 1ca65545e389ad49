"""Feature scaling with global statistics, fitted on the training rows of all ranks exactly.

z-score merges per-rank (count, mean, M2) with Chan's formula in rank order (never an average of
per-rank means); min-max reduces minima and maxima. The fitted ``Scaler`` is stored in model.h5.
In reproducible mode (``blocks`` given) z-score merges per-block moments in global block order
instead, so the statistics are bitwise the same for any rank count.

Memory stays in proportion to the data: statistics are summed and the scaler applied in
cache-sized row pieces (``piece_rows``), never through float64 temporaries of a whole block. The
pieces give the very bits of the whole-block formulas: NumPy sums the rows of a C-contiguous
(n, d >= 2) array one after another per column, so a piece's sum seeded with the running sum
(its first row) continues that sequence exactly; element-wise arithmetic has no order at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..comm.base import Communicator
from .reader import aligned_empty


@dataclass(slots=True)
class Scaler:
    """``x' = (x - shift) / scale`` per feature; ``kind`` is "none", "zscore" or "minmax"."""

    kind: str
    shift: np.ndarray
    scale: np.ndarray

    def apply(self, X: np.ndarray) -> np.ndarray:
        """A scaled copy of ``X`` in its own dtype (``X`` itself when kind is "none").

        Element for element ``(X - shift) / scale`` (in float64) cast to X's dtype, computed a
        piece of rows at a time: the caller's array is left as it is.
        """
        if self.kind == "none":
            return X
        return self._scale_into(X, aligned_empty(X.shape, X.dtype))

    def apply_(self, X: np.ndarray) -> np.ndarray:
        """``X`` scaled in place (the same bits as ``apply``), for arrays the caller owns: a
        block just read holds its rows once, not twice."""
        if self.kind == "none" or not X.flags.writeable:
            return self.apply(X)
        return self._scale_into(X, X)

    def _scale_into(self, X: np.ndarray, out: np.ndarray) -> np.ndarray:
        n = X.shape[0]
        if X.ndim != 2 or n == 0:
            out[...] = (X - self.shift) / self.scale
            return out
        step = piece_rows(X.shape[1])
        wide = np.result_type(X.dtype, self.shift.dtype, self.scale.dtype)
        # The float64 intermediate of the whole-array expression, one piece at a time; when the
        # expression's dtypes are anything else, the expression itself runs per piece.
        fast = wide == np.float64 and self.shift.dtype == self.scale.dtype == np.float64
        tmp = np.empty((min(step, n), X.shape[1]), np.float64) if fast else None
        for a in range(0, n, step):
            b = min(n, a + step)
            if tmp is None:
                out[a:b] = (X[a:b] - self.shift) / self.scale
                continue
            t = out[a:b] if out.dtype == np.float64 else tmp[: b - a]
            np.subtract(X[a:b], self.shift, out=t)
            np.divide(t, self.scale, out=t)
            if out.dtype != np.float64:
                out[a:b] = t
        return out

    @classmethod
    def identity(cls, d: int) -> Scaler:
        return cls("none", np.zeros(d), np.ones(d))


def merge_moments(
    parts: list[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise merge of (count, mean, M2), applied left to right."""
    n, mean, m2 = parts[0]
    for nb, mb, m2b in parts[1:]:
        if nb == 0:
            continue
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (n * nb / tot)
        n = tot
    return n, mean, m2


PIECE_BYTES = 1 << 20  # float64 bytes of one row piece: a few pieces fit in a core's cache


def piece_rows(d: int) -> int:
    """Rows of ``d`` features per piece of the piecewise statistics and scaling."""
    return max(1, PIECE_BYTES // (8 * max(d, 1)))


def local_moments(X: np.ndarray, step: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) of ``X``'s rows: the bits of ``X.mean(axis=0, dtype=float64)`` and
    ``((X - mean) ** 2).sum(axis=0, dtype=float64)`` without the latter's whole-block float64
    temporaries (``step``: rows per piece, ``piece_rows`` by default)."""
    n = X.shape[0]
    if n == 0:
        return 0, np.zeros(X.shape[1]), np.zeros(X.shape[1])
    mean = X.mean(axis=0, dtype=np.float64)  # buffered casts: no whole-block temporary
    return n, mean, sum_squared_deviations(X, mean, step)


def sum_squared_deviations(X: np.ndarray, mean: np.ndarray, step: int | None = None) -> np.ndarray:
    """``((X - mean) ** 2).sum(axis=0, dtype=float64)``, bitwise, one piece of rows at a time.

    Each piece's squares go below the running sum in a small buffer whose column sums continue
    NumPy's row-after-row sequence. One column (summed pairwise by NumPy) and non-contiguous
    arrays take the whole-block formula.
    """
    n, d = X.shape
    if d < 2 or not X.flags.c_contiguous:
        return ((X - mean) ** 2).sum(axis=0, dtype=np.float64)
    step = step or piece_rows(d)
    if n <= step:
        return ((X - mean) ** 2).sum(axis=0, dtype=np.float64)
    buf = np.empty((step + 1, d), np.float64)
    acc = np.zeros(d)
    for a in range(0, n, step):
        b = min(n, a + step)
        k = b - a
        buf[0] = acc
        sq = buf[1 : k + 1]
        np.subtract(X[a:b], mean, out=sq)
        np.square(sq, out=sq)
        acc = buf[: k + 1].sum(axis=0, dtype=np.float64)
    return acc


def block_moments(X: np.ndarray, blocks: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(count, mean, M2) of each run of equal ``blocks`` ids (ascending), in order."""
    if X.shape[0] == 0:
        return []
    cuts = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
    bounds = zip(np.r_[0, cuts], np.r_[cuts, X.shape[0]], strict=True)
    return [local_moments(X[a:b]) for a, b in bounds]


def fit_scaler(
    kind: str, X: np.ndarray, comm: Communicator, blocks: np.ndarray | None = None
) -> Scaler:
    """Fit a scaler on the training rows of every rank; all ranks get identical statistics.

    ``blocks``: the global block of each row (ascending); z-score moments are then merged block
    by block in global order, independent of the rank count.
    """
    d = X.shape[1]
    if kind == "none":
        return Scaler.identity(d)
    if kind == "zscore":
        if blocks is None:
            parts = comm.allgather(local_moments(X))
        else:  # ranks hold ascending runs of whole blocks: rank order is block order
            parts = [p for rank in comm.allgather(block_moments(X, blocks)) for p in rank]
            parts = parts or [local_moments(X)]
        n, mean, m2 = merge_moments(parts)
        std = np.sqrt(m2 / max(n, 1))
        return Scaler(kind, mean, np.where(std > 0, std, 1.0))
    if kind == "minmax":
        lo = np.full(d, np.inf) if X.shape[0] == 0 else X.min(axis=0).astype(np.float64)
        hi = np.full(d, -np.inf) if X.shape[0] == 0 else X.max(axis=0).astype(np.float64)
        comm.allreduce_min_(lo)
        comm.allreduce_max_(hi)
        span = hi - lo
        return Scaler(kind, lo, np.where(span > 0, span, 1.0))
    raise ValueError(kind)

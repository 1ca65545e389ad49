"""Feature scaling with global statistics, fitted on the training rows of all ranks exactly.

z-score merges per-rank (count, mean, M2) with Chan's formula in rank order (never an average of
per-rank means); min-max reduces minima and maxima. The fitted ``Scaler`` is stored in model.h5.
In reproducible mode (``blocks`` given) z-score merges per-block moments in global block order
instead, so the statistics are bitwise the same for any rank count.
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
        """A scaled copy of ``X`` in its own dtype (``X`` itself when kind is "none")."""
        if self.kind == "none":
            return X
        out = aligned_empty(X.shape, X.dtype)
        out[...] = (X - self.shift) / self.scale
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


def local_moments(X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    n = X.shape[0]
    if n == 0:
        return 0, np.zeros(X.shape[1]), np.zeros(X.shape[1])
    mean = X.mean(axis=0, dtype=np.float64)
    m2 = ((X - mean) ** 2).sum(axis=0, dtype=np.float64)
    return n, mean, m2


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

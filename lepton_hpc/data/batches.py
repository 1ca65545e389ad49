"""Seeded mini-batches that do not depend on the rank count.

Epoch e orders the global training rows by a pseudo-random permutation keyed by (seed, e) and
cuts it into global batches of B rows. The permutation is a Feistel network over the row index,
computed pointwise, so each rank finds its own rows' batches without holding the whole order.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of uint64 values."""
    z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def uniform(keys: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform number in [0, 1) per key (e.g. a global row index) for a seed and a stream."""
    with np.errstate(over="ignore"):
        salt = mix64(np.array([seed * 1_000_003 + stream], dtype=np.uint64))[0]
        h = mix64(keys.astype(np.uint64) ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def permute(index: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 4) -> np.ndarray:
    """Position of each ``index`` in [0, n) under a keyed random permutation (cycle walking)."""
    if n <= 1:
        return index.astype(np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    lo_mask = np.uint64((1 << half) - 1)
    keys = mix64(np.arange(rounds, dtype=np.uint64) + np.uint64(seed * 7919 + epoch * 104_729))

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & lo_mask
        for k in keys:
            left, right = right, left ^ (mix64(right ^ k) & lo_mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        out = feistel(index.astype(np.uint64))
        todo = out >= np.uint64(n)
        while todo.any():  # the domain is < 4n, so this ends after a few passes
            out[todo] = feistel(out[todo])
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


def local_batches(
    train_index: np.ndarray, n_train: int, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Local row positions of each global batch of the epoch (some lists may be empty).

    ``train_index`` is the global training-row number (0..n_train-1) of each local training row.
    Every rank gets the same number of batches, so every rank takes part in every step.
    """
    if batch_size <= 0 or batch_size >= n_train:
        return [np.arange(train_index.size)]
    pos = permute(train_index, n_train, seed, epoch)
    batch = pos // batch_size
    order = np.argsort(pos, kind="stable")
    steps = -(-n_train // batch_size)
    cuts = np.searchsorted(batch[order], np.arange(1, steps))
    return np.split(order, cuts)

"""Synthetic data sets written by all ranks in parallel, identical whatever the rank count.

Rows are generated in fixed global chunks, each from a random stream keyed by (seed, chunk), so
row i has the same value on any number of ranks; each rank writes only its own block of rows.
"""

from __future__ import annotations

import numpy as np

from ..comm.base import Communicator
from .h5 import create_parallel, write_rows
from .reader import row_block

CHUNK = 65_536
TASKS = ("linear", "logistic", "blobs")


def true_model(task: str, d: int, seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (d x k) and intercepts (k) the data is generated from."""
    rng = np.random.default_rng([seed, 0xC0EF])
    k = classes if task == "blobs" else 1
    if task == "blobs":
        return rng.normal(0.0, 3.0, size=(k, d)), np.zeros(k)
    w = rng.normal(0.0, 1.0, size=(d, k)) / np.sqrt(d) * (3.0 if task == "logistic" else 1.0)
    return w, rng.normal(0.0, 0.5, size=k)


def generate_rows(
    task: str, start: int, stop: int, d: int, seed: int, *, noise: float = 0.1, classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the data set: X float32 (n x d), y float64 (n)."""
    w, b = true_model(task, d, seed, classes)
    X = np.empty((stop - start, d), dtype=np.float32)
    y = np.empty(stop - start, dtype=np.float64)
    for c in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
        lo, hi = max(start, c * CHUNK), min(stop, (c + 1) * CHUNK)
        rng = np.random.default_rng([seed, c])
        full = CHUNK  # draw the whole chunk so a row's value does not depend on the block
        if task == "blobs":
            labels = rng.integers(0, classes, size=full)
            feats = w[labels] + rng.normal(size=(full, d))
            target = labels.astype(np.float64)
        else:
            feats = rng.normal(size=(full, d))
            z = (feats @ w)[:, 0] + b[0]
            if task == "linear":
                target = z + noise * rng.normal(size=full)
            else:
                target = (rng.random(full) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
        sl = slice(lo - c * CHUNK, hi - c * CHUNK)
        X[lo - start : hi - start] = feats[sl]
        y[lo - start : hi - start] = target[sl]
    return X, y


def write_dataset(
    path: str,
    task: str,
    n_rows: int,
    d: int,
    seed: int,
    comm: Communicator,
    *,
    noise: float = 0.1,
    classes: int = 3,
    force: bool = False,
    start_row: int = 0,
) -> None:
    """Write rows ``[start_row, start_row + n_rows)`` of a synthetic task to ``path``.

    Each rank writes its own rows. A test set is a later range of the same seed's stream (same
    true model, disjoint rows), e.g. ``start_row`` = the training set's row count.
    """
    start, stop = row_block(n_rows, comm.rank, comm.size)
    X, y = generate_rows(
        task, start_row + start, start_row + stop, d, seed, noise=noise, classes=classes
    )
    w, b = true_model(task, d, seed, classes)
    with create_parallel(path, comm, force=force, nbytes=n_rows * (d * 4 + 8)) as fh:
        dx = fh.create_dataset("X", shape=(n_rows, d), dtype=np.float32)
        dy = fh.create_dataset("y", shape=(n_rows,), dtype=np.float64)
        write_rows(dx, start, X, comm)
        write_rows(dy, start, y, comm)
        fh.attrs.update(
            {
                "task": task,
                "seed": seed,
                "noise": noise,
                "start_row": start_row,
                "generator": "lepton datagen",
            }
        )
        fh.attrs["true_coef"] = w
        fh.attrs["true_intercept"] = b

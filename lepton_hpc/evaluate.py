"""Model outputs and exact metrics over partitioned rows (shared by train, evaluate, predict)."""

from __future__ import annotations

import numpy as np

from .comm.base import Communicator
from .device import Device
from .metrics import compute_metrics
from .models import Model

CHUNK_ROWS = 65_536  # bounds the output buffer of a forward pass


def forward(model: Model, params: np.ndarray, X, device: Device) -> np.ndarray:
    """Model outputs (n x k, float64) for the rows of ``X``, computed in chunks."""
    n = X.shape[0]
    out = np.empty((n, model.n_outputs), dtype=np.float64)
    sizes = np.asarray(model.sizes, dtype=np.int64)
    act, head = model.codes
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        device.kernels.forward(X[lo:hi], params, sizes, act, head, out[lo:hi])
    return out


def evaluate(
    model: Model, params: np.ndarray, X, y: np.ndarray, device: Device, comm: Communicator
) -> dict:
    """Exact global metrics of ``params`` on every rank's rows (all ranks get the same dict)."""
    out = forward(model, params, X, device)
    return compute_metrics(y, out, model.head, model.n_classes, comm)

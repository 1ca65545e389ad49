"""Where a rank's kernels run: the CPU (Numba threads) or its node-local GPU (numba.cuda).

Detection is lazy and done once here, so ``lepton doctor`` and training share it; the thread
count is set so that ranks x threads does not oversubscribe the node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .comm.base import Communicator
from .errors import LeptonError


@dataclass(slots=True)
class Device:
    """A kernel backend (module with ``gradient`` and ``forward``) and how to place data."""

    name: str
    kernels: ModuleType
    threads: int = 1
    gpu: int | None = None

    def place(self, array: np.ndarray):
        """The array where the kernels want it: the GPU copy stays there across epochs."""
        if self.name == "cuda":
            return self.kernels.to_device(array)
        return array

    def batch_gather(self, X_host: np.ndarray, y_host: np.ndarray, X, y):
        """A callable ``rows -> (X[rows], y[rows])`` for mini-batches, where the kernels want them.

        ``X_host``/``y_host`` are the rank's rows in host memory, ``X``/``y`` what ``place`` made
        of them. On the GPU the data stays there and is gathered there; on the CPU into buffers
        reused from step to step.
        """
        if self.name == "cuda":
            kernels = self.kernels
            return lambda rows: kernels.gather_rows(X, y, rows)
        from .data.batches import BatchGather

        return BatchGather(X_host, y_host)

    def gradient(self, X, y, params, sizes, activation, head, out) -> None:
        """Summed loss gradient, loss and row count into ``out`` (see ``lepton_hpc.kernels``)."""
        self.kernels.gradient(X, y, params, sizes, activation, head, out)

    def forward(self, X, params, sizes, activation, head, out) -> None:
        """Model outputs into ``out`` (see ``lepton_hpc.kernels``)."""
        self.kernels.forward(X, params, sizes, activation, head, out)


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(comm: Communicator) -> int:
    """Cores this rank may use: the node's cores shared by its ranks, within its CPU binding."""
    per_rank = max(1, (os.cpu_count() or 1) // max(comm.node_size, 1))
    return max(1, min(per_rank, cores_available()))


def cuda_available() -> bool:
    try:
        from .kernels import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def select_device(name: str, threads: int, comm: Communicator) -> Device:
    """The device for ``train.device`` ("cpu", "cuda" or "auto") on this rank."""
    if name in ("cuda", "auto") and cuda_available():
        from .kernels import cuda

        gpu = cuda.select_device(comm.node_rank)
        return Device("cuda", cuda, threads=1, gpu=gpu)
    if name == "cuda":
        raise LeptonError('train.device = "cuda" but Numba sees no GPU on this node')
    import numba

    from .kernels import cpu

    n = threads or default_threads(comm)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return Device("cpu", cpu, threads=numba.get_num_threads())

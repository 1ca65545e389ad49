"""Where a rank's kernels run: the CPU (Numba threads) or its node-local GPU (numba.cuda).

Both are a ``Backend``: the engine places data, gathers mini-batches and calls the kernels
through it, the same way on either. Detection is lazy and done once here, so ``lepton doctor``
and training share it; the thread count is set so that ranks x threads does not oversubscribe
the node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np

from .comm.base import Communicator
from .cores import cores_available, default_threads  # noqa: F401 - importable from here too
from .errors import LeptonError


@runtime_checkable
class Backend(Protocol):
    """What the training step and inference ask of a device; never which device it is."""

    def place(self, array: np.ndarray):
        """The array where the kernels want it (the same array, or a copy kept on the GPU)."""

    def batch_gather(
        self, X_host: np.ndarray, y_host: np.ndarray, X, y
    ) -> Callable[[np.ndarray], tuple]:
        """A callable ``rows -> (X[rows], y[rows])`` for mini-batches, where the kernels want
        them; ``X_host``/``y_host`` are the rank's rows in host memory, ``X``/``y`` what
        ``place`` made of them."""

    def taken_gather(
        self, X_host: np.ndarray, y_host: np.ndarray, sizes, head: int
    ) -> Callable[[np.ndarray], tuple] | None:
        """A callable ``rows -> (TakenBatch, None)``: mini-batches that ``gradient`` reads where
        their rows are, with no copy; None where the kernels want the rows copied
        (``batch_gather``)."""

    def gradient(self, X, y, params, sizes, activation, head, out) -> None:
        """Summed loss gradient, loss and row count into ``out`` (see ``lepton_hpc.kernels``);
        X may be a ``TakenBatch`` of ``taken_gather`` (y is then unused)."""

    def forward(self, X, params, sizes, activation, head, out) -> None:
        """Model outputs into ``out`` (see ``lepton_hpc.kernels``)."""

    def sliced_gradient(
        self, X, y, local, plan, activation, head, out, allreduce, flag=0.0
    ) -> float:
        """One tensor-parallel slice's gradient, loss and rows into ``out``; returns the stop
        flag summed over the tensor group (see ``lepton_hpc.kernels.tensor``)."""

    def sliced_forward(self, X, local, plan, activation, head, out, allreduce) -> None:
        """Model outputs into ``out`` from one tensor-parallel slice (see
        ``lepton_hpc.kernels.tensor``)."""


class TakenBatch:
    """A mini-batch left where its rows are: the rank's rows as ``kernels.cpu.taken_rows``
    prepared them (``taken``) and the batch's positions ``rows`` in them.
    The CPU backend's gradient reads it in place (``Device.gradient``), with the same bits as
    on the copied rows; only reductions that hand the batch to that gradient as it is take
    such batches (``FusedReduction.in_place``)."""

    __slots__ = ("rows", "taken")

    def __init__(self, taken, rows: np.ndarray) -> None:
        self.taken, self.rows = taken, rows


@dataclass(slots=True)
class Device:
    """The CPU backend (``kernels``: a module with ``gradient`` and ``forward``; the
    tensor-parallel slices are ``kernels.tensor``): host arrays stay where they are; mini-batches
    are gathered into buffers reused from step to step."""

    name: str
    kernels: ModuleType
    threads: int = 1
    gpu: int | None = None
    products: str = "float64"
    """``train.products``: "float32" lets the CPU's GEMM path of wide MLPs and the one-output
    kernel of wide float32 rows multiply in float32."""

    def place(self, array: np.ndarray):
        return array

    def batch_gather(self, X_host: np.ndarray, y_host: np.ndarray, X, y):  # noqa: ARG002
        from .data.batches import BatchGather

        return BatchGather(X_host, y_host)

    def taken_gather(self, X_host: np.ndarray, y_host: np.ndarray, sizes, head: int):
        prepare = getattr(self.kernels, "taken_rows", None)
        taken = None if prepare is None else prepare(X_host, y_host, sizes, head, self.products)
        if taken is None:
            return None
        return lambda rows: (TakenBatch(taken, rows), None)

    def gradient(self, X, y, params, sizes, activation, head, out) -> None:
        if type(X) is TakenBatch:
            self.kernels.gradient_rows(X.taken, X.rows, params, out)
            return
        self.kernels.gradient(X, y, params, sizes, activation, head, out, self.products)

    def forward(self, X, params, sizes, activation, head, out) -> None:
        self.kernels.forward(X, params, sizes, activation, head, out)  # always float64

    def sliced_gradient(
        self, X, y, local, plan, activation, head, out, allreduce, flag=0.0
    ) -> float:
        return self.tensor_kernels().sliced_gradient(
            X, y, local, plan, activation, head, out, allreduce, flag
        )

    def sliced_forward(self, X, local, plan, activation, head, out, allreduce) -> None:
        self.tensor_kernels().sliced_forward(X, local, plan, activation, head, out, allreduce)

    def tensor_kernels(self) -> ModuleType:
        """The module of the tensor-parallel slices: ``kernels.tensor`` (Numba CPU threads)."""
        from .kernels import tensor

        return tensor


@dataclass(slots=True)
class CudaDevice(Device):
    """The GPU backend (``kernels``: ``lepton_hpc.kernels.cuda``, the slices
    ``kernels.cuda_tensor``): the rank's rows are copied to the GPU once and stay there across
    epochs; mini-batches are gathered there."""

    def place(self, array: np.ndarray):
        return self.kernels.to_device(array)

    def gradient(self, X, y, params, sizes, activation, head, out) -> None:
        self.kernels.gradient(X, y, params, sizes, activation, head, out)  # float64 products

    def batch_gather(self, X_host: np.ndarray, y_host: np.ndarray, X, y):  # noqa: ARG002
        kernels = self.kernels
        return lambda rows: kernels.gather_rows(X, y, rows)

    def taken_gather(self, X_host, y_host, sizes, head: int):  # noqa: ARG002
        return None  # batches are gathered on the GPU (``batch_gather``)

    def tensor_kernels(self) -> ModuleType:
        """``kernels.cuda_tensor``: the slices' kernels on the GPU (rows on the host or GPU)."""
        from .kernels import cuda_tensor

        return cuda_tensor


def cuda_available() -> bool:
    try:
        from .kernels import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def select_device(name: str, threads: int, comm: Communicator, products: str = "float64") -> Device:
    """The device for ``train.device`` ("cpu", "cuda" or "auto") on this rank; ``products``
    is ``train.products`` (the GPU kernels keep float64)."""
    if name in ("cuda", "auto") and cuda_available():
        from .kernels import cuda

        gpu = cuda.select_device(comm.node_rank)
        return CudaDevice("cuda", cuda, threads=1, gpu=gpu)
    if name == "cuda":
        raise LeptonError('train.device = "cuda" but Numba sees no GPU on this node')
    import numba

    from .kernels import cpu

    n = threads or default_threads(comm)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return Device("cpu", cpu, threads=numba.get_num_threads(), products=products)

"""Full-batch passes over streamed rows (``data.stream``): the gradient and the metrics.

``StreamedReduction`` stands where the in-memory reduction stands in a ``StepContext``: its
``local_sums`` ignores the (absent) in-memory rows and runs the wrapped reduction's kernel pass
on every piece of the rank's ``RowStream``. In reproducible mode the pieces are whole global
blocks, so the (block id, partial sums) pairs it collects are exactly those the in-memory pass
makes, and the block-ordered sum gives the same bits; otherwise the pieces' float64 sums are
added in piece order. The reduction itself (allreduce or block-ordered allgather) is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..comm.base import agree
from ..data.stream import RowStream
from ..inference import add_outputs
from ..metrics import MetricSums
from .strategies import BlockOrderedReduction, FusedReduction


class StreamedReduction:
    """The kernel pass of ``inner`` over every piece of ``stream``, then ``inner``'s reduction."""

    def __init__(self, inner: FusedReduction, stream: RowStream) -> None:
        self.inner, self.stream = inner, stream
        self.blocks = isinstance(inner, BlockOrderedReduction)

    def arrange(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def local_sums(self, params, X, y, out: np.ndarray, rows=None) -> None:  # noqa: ARG002
        inner, place = self.inner, self.stream.place
        out[:] = 0.0
        ids, parts = [np.zeros(0, dtype=np.int64)], [np.zeros((0, out.size))]
        piece = np.empty_like(out)
        for train, _ in self.stream.passes():
            if train.n == 0:
                continue
            if self.blocks:
                inner.block = train.ids // self.stream.block_rows
                inner.local_sums(params, place(train.X), place(train.y), out, None)
                ids.append(inner._ids)
                parts.append(inner._parts)
            else:
                inner.kernel(place(train.X), place(train.y), params, piece)
                out += piece
        if self.blocks:
            inner._ids, inner._parts = np.concatenate(ids), np.concatenate(parts)

    def reduce_(self, buf: np.ndarray) -> None:
        self.inner.reduce_(buf)

    def ireduce_(self, buf: np.ndarray) -> Any:
        return self.inner.ireduce_(buf)

    def reset(self) -> None:
        self.inner.reset()


def streamed_metrics(setup, params: np.ndarray) -> tuple[dict, dict | None]:
    """Exact global metrics of ``params`` on the training and validation rows, in one pass
    (integer counts and exact sums: the in-memory metrics' bits)."""
    model, stream, data = setup.model, setup.stream, setup.data
    k = model.n_classes
    train = MetricSums(model.head, k, data.train.y_mean)
    val = MetricSums(model.head, k, data.val.y_mean) if data.val is not None else None
    for t, v in stream.passes(want_val=val is not None):
        if t.n:
            add_outputs(train, model, params, stream.place(t.X), t.y, setup.device)
        if val is not None and v is not None and v.n:
            add_outputs(val, model, params, stream.place(v.X), v.y, setup.device)
    comm = setup.comm
    return train.result(comm), (val.result(comm) if val is not None else None)


def streamed_test_metrics(setup, params: np.ndarray) -> dict:
    """Exact global metrics of ``params`` on ``data.test`` streamed like the training rows
    (``data.stream``): a first pass checks NaN/Inf, counts the rows and sums the targets
    exactly (``RowStream.fit``; no hold-out), and the labels and features are checked against
    the model; then one pass scaled with the training scaler. The test rows are never held."""
    cfg, comm = setup.cfg, setup.comm
    setup.stream.release()  # training's passes are over: its buffers go before the test's come
    test_cfg = dataclasses.replace(cfg.data, train=cfg.data.test, validation_fraction=0.0, folds=0)
    stream = RowStream(test_cfg, cfg.train.seed, comm, reproducible=cfg.comm.reproducible)
    agree(comm, lambda: setup.check_test(stream.info, None))  # the model's features first
    split, _, _, stats = stream.fit()
    agree(comm, lambda: setup.check_test(stream.info, stats))
    stream.scaler, stream.place = setup.data.scaler, setup.device.place
    model = setup.model
    sums = MetricSums(model.head, model.n_classes, split.y_mean)
    for part, _ in stream.passes():
        if part.n:
            add_outputs(sums, model, params, stream.place(part.X), part.y, setup.device)
    return sums.result(comm)

"""Training rows that are already in memory: each rank's NumPy arrays as the reader's ``Block``.

The Python estimators pass the rows each rank holds (any split, uneven or empty on some ranks)
instead of an HDF5 path. ``ArraySource`` turns them into the same ``Block`` the file reader
gives: the rank's rows numbered by their global position in the concatenation of every rank's
rows in rank order (an exclusive scan of the block sizes), so the validation split, the batches
and the reductions see exactly the rows a single process holding all of them would see.

Reproducible mode needs each rank to hold whole global blocks (``reader.global_block_rows``);
rows on the wrong rank are moved there (``comm.exchange.move_rows``), so the result is the same
bits whatever the caller's split.

The data fingerprint (recorded in checkpoints and the model, checked on resume) is defined as for
files: shapes, dtypes and a SHA-256 of the same sampled global rows, gathered from the ranks that
hold them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ..comm.base import CollectiveError, Communicator, agree
from ..comm.exchange import move_rows
from ..errors import DataError
from ..log import Log
from .fingerprint import VERSION, _canonical, _dtype_name, sample_rows
from .reader import (
    Block,
    DataInfo,
    _handle_nonfinite,
    aligned_empty,
    aligned_row_block,
    global_block_rows,
)


class ArraySource:
    """This rank's rows ``X`` (rows x features; 1-D: one feature) and targets ``y`` (or None).

    ``name`` stands for the file name in messages and records. The arrays are copied when read,
    never modified.
    """

    def __init__(self, X: Any, y: Any = None, *, name: str = "<arrays>") -> None:
        self.X, self.y, self.name = X, y, name
        self._fingerprint: dict | None = None

    # ---- checks ---------------------------------------------------------------------------
    def _local(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The rank's arrays as NumPy, checked (shapes, numeric types); a DataError says why."""
        X = np.asarray(self.X)
        if X.dtype.kind not in "fiub":
            raise DataError(f"{self.name}: X has dtype {X.dtype}, which is not numeric")
        if X.ndim == 1:
            X = X.reshape(-1, 1)
        if X.ndim != 2:
            raise DataError(f"{self.name}: X must be 2-D (rows x features), has shape {X.shape}")
        y = None
        if self.y is not None:
            y = np.asarray(self.y)
            if y.dtype.kind not in "fiub":
                raise DataError(f"{self.name}: y has dtype {y.dtype}, which is not numeric")
            if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
                raise DataError(
                    f"{self.name}: y has shape {y.shape} but X has {X.shape[0]} rows; "
                    "targets need one row per row of features"
                )
            if y.ndim == 2 and y.shape[1] == 1:
                y = y.reshape(-1)
        return X, y

    # ---- the reader's interface -----------------------------------------------------------
    def read_block(
        self,
        comm: Communicator,
        log: Log,  # noqa: ARG002 - the file reader's signature
        *,
        nonfinite: str = "error",
        aligned: bool = False,
    ) -> Block:
        """This rank's rows as a ``Block`` numbered globally; see the module docstring."""
        X, y = agree(comm, self._local)
        shapes = comm.allgather(
            (X.shape[0], X.shape[1], X.dtype.str, None if y is None else y.shape[1:])
        )
        info = agree(comm, lambda: self._info(shapes))
        start = comm.exscan(X.shape[0])
        dtype = np.dtype(info.x_dtype)
        Xl = aligned_empty(X.shape, dtype)
        Xl[...] = X
        yl = None if y is None else np.array(y, dtype=np.float64)
        self._fingerprint = self._fingerprint_of(comm, Xl, yl, start, info)
        if aligned:
            block_rows = global_block_rows(info.n_rows)
            n_blocks = -(-info.n_rows // block_rows)
            if n_blocks < comm.size:  # every rank computed the same numbers: all raise
                raise CollectiveError(
                    f"{self.name}: {info.n_rows} rows make {n_blocks} blocks of {block_rows} "
                    f"rows, fewer than the {comm.size} ranks (comm.reproducible gives whole "
                    "blocks to ranks)",
                    DataError.exit_code,
                )
            want = aligned_row_block(info.n_rows, comm.rank, comm.size, block_rows)
            parts = [Xl] if yl is None else [Xl, yl]
            moved = move_rows(comm, parts, start, want)
            Xl = aligned_empty(moved[0].shape, dtype)
            Xl[...] = moved[0]
            yl = None if yl is None else np.ascontiguousarray(moved[1])
            start = want[0]
        return _handle_nonfinite(Block(Xl, yl, info, start), comm, nonfinite)

    def _info(self, shapes: list[tuple]) -> DataInfo:
        """What every rank's arrays make together: rows, features, one dtype, target shape."""
        n = sum(s[0] for s in shapes)
        widths = {s[1] for s in shapes if s[0] > 0} or {shapes[0][1]}
        if len(widths) > 1:
            per_rank = ", ".join(f"rank {r}: {s[1]}" for r, s in enumerate(shapes))
            raise DataError(f"{self.name}: ranks pass rows of different widths ({per_rank})")
        (d,) = widths
        if n == 0 or d == 0:
            raise DataError(f"{self.name}: no rows to train on ({n} rows x {d} features)")
        kinds = {np.dtype(s[2]) for s in shapes if s[0] > 0}
        dtype = np.float32 if kinds == {np.dtype(np.float32)} else np.float64
        has_y = {s[3] is not None for s in shapes}
        if len(has_y) > 1:
            raise DataError(f"{self.name}: some ranks pass targets y and others do not")
        y_shape = None
        if has_y == {True}:
            tails = {s[3] for s in shapes if s[0] > 0} or {shapes[0][3]}
            if len(tails) > 1:
                raise DataError(f"{self.name}: ranks pass targets of different shapes {tails}")
            y_shape = (n, *tails.pop())
        return DataInfo(
            self.name, "X", None if y_shape is None else "y", n, d, np.dtype(dtype).name, y_shape
        )

    def _fingerprint_of(
        self,
        comm: Communicator,
        X: np.ndarray,
        y: np.ndarray | None,
        start: int,
        info: DataInfo,
    ) -> dict:
        """The file fingerprint's fields for these rows (every rank gets the same dict)."""
        rows = sample_rows(info.n_rows)
        mine = rows[(rows >= start) & (rows < start + X.shape[0])] - start
        parts = comm.allgather((X[mine], None if y is None else y[mine]))
        shape_x = [info.n_rows, info.n_features]
        shape_y = None if info.y_shape is None else list(info.y_shape)
        digest = hashlib.sha256(VERSION)
        digest.update(json.dumps([shape_x, shape_y]).encode())
        xs = np.concatenate([p[0] for p in parts])
        digest.update(xs.dtype.newbyteorder("<").str.encode())
        digest.update(_canonical(xs))
        if info.y_shape is not None:
            ys = np.concatenate([p[1] for p in parts])
            digest.update(ys.dtype.newbyteorder("<").str.encode())
            digest.update(_canonical(ys))
        return {
            "path": self.name,
            "x": "X",
            "y": info.y,
            "shape_x": shape_x,
            "dtype_x": _dtype_name(info.x_dtype),
            "shape_y": shape_y,
            "dtype_y": None if info.y_shape is None else "float64",
            "sample_sha256": digest.hexdigest(),
        }

    def fingerprint(self) -> dict:
        """The fingerprint of the rows of the last ``read_block`` (identical on every rank)."""
        if self._fingerprint is None:
            raise RuntimeError("fingerprint() before read_block()")
        return self._fingerprint

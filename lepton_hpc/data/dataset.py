"""From a config's [data] section to this rank's scaled training and validation rows.

The validation split is a hash of (seed, global row index) against the fraction, so the same
rows are held out whatever the rank count; the scaler is fitted on the training rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..comm.base import Communicator
from ..log import Log
from .batches import uniform
from .preprocess import Scaler, fit_scaler
from .reader import (
    Block,
    DataInfo,
    _piece,
    aligned_empty,
    compact_rows,
    global_block_rows,
    read_block,
    row_ids,
)

VALIDATION_STREAM = 1


@dataclass(slots=True)
class Split:
    """One part of the data on this rank, scaled, with global counts for exact means."""

    X: np.ndarray
    y: np.ndarray
    n_global: int
    offset: int  # number of rows of this part on lower ranks (for rank-count-free ordering)
    start: int = 0  # global row id (in the file) of the first local row
    ids: np.ndarray | None = None  # global row ids, when they are not start..start+n
    kept: np.ndarray | None = None  # or: which of the rows start.. are these (1 byte a row)
    blocks: np.ndarray | None = None  # reproducible mode: the global block of each row

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def rows(self) -> np.ndarray:
        """Global row ids in the file (built when asked for)."""
        if self.ids is None and self.kept is not None:
            at = np.flatnonzero(self.kept).astype(np.int64, copy=False)
            at += self.start
            return at
        return row_ids(self.start, self.n, self.ids)

    def index(self) -> np.ndarray:
        """Global position of each local row within this part (0..n_global-1)."""
        return self.offset + np.arange(self.n, dtype=np.int64)


def make_split(
    X: np.ndarray, y: np.ndarray, comm: Communicator, start: int, ids: np.ndarray | None = None
) -> Split:
    """A Split of these rows: global row ids ``ids``, or ``start..`` when they are contiguous."""
    counts = comm.allreduce_(np.array([X.shape[0]], dtype=np.int64))
    return Split(X, y, int(counts[0]), comm.exscan(X.shape[0]), start, ids)


def validation_mask(
    rows: np.ndarray, fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> np.ndarray:
    """True for rows held out for validation; depends only on (seed, global row id).

    With ``folds`` >= 2 (k-fold cross-validation) the same hash deals the rows into k folds and
    fold ``fold`` is held out, so the k validation sets partition the rows.
    """
    if folds >= 2:
        return np.floor(uniform(rows, seed, VALIDATION_STREAM) * folds) == fold
    if fraction <= 0:
        return np.zeros(rows.size, dtype=bool)
    return uniform(rows, seed, VALIDATION_STREAM) < fraction


def held_out(block: Block, data_cfg, seed: int) -> np.ndarray:
    """The validation mask of the block's rows, hashed a piece of row ids at a time (the hash's
    integer temporaries are then a few MB, not several times the block's row count)."""
    n = block.n
    hold = np.empty(n, dtype=bool)
    step = 1 << 16
    for a in range(0, n, step):
        b = min(n, a + step)
        rows = (
            np.arange(block.start + a, block.start + b, dtype=np.int64)
            if block.ids is None
            else block.ids[a:b]
        )
        hold[a:b] = validation_mask(
            rows, data_cfg.validation_fraction, seed, data_cfg.folds, data_cfg.fold
        )
    return hold


def block_ids(
    start: int,
    n: int,
    ids: np.ndarray | None,
    kept: np.ndarray | None,
    block_rows: int,
    n_file_rows: int,
) -> np.ndarray:
    """The global block of each of ``n`` rows given as ``ids``, as the rows ``kept`` of
    ``start..``, or as ``start..start+n`` (int32 where the blocks fit), a piece at a time: no
    row ids of the whole block (8 bytes a row) are made."""
    dtype = np.int32 if -(-n_file_rows // block_rows) < 2**31 else np.int64
    out = np.empty(n, dtype=dtype)
    step, dst = 1 << 16, 0
    total = n if kept is None or ids is not None else kept.size
    for a in range(0, total, step):
        b = min(total, a + step)
        if ids is not None:
            rows = ids[a:b]
        elif kept is not None:
            rows = np.flatnonzero(kept[a:b]) + (start + a)
        else:
            rows = np.arange(start + a, start + b, dtype=np.int64)
        out[dst : dst + rows.size] = rows // block_rows
        dst += rows.size
    return out


def _ids_where(block: Block, mask: np.ndarray) -> np.ndarray:
    """Global row ids of the block's rows where ``mask`` is true."""
    if block.ids is not None:
        return block.ids[mask]
    at = np.flatnonzero(mask).astype(np.int64, copy=False)
    at += block.start
    return at


def gather_rows(A: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``A[mask]`` into a new 64-byte aligned array, a piece of rows at a time (``np.compress``
    into ``out`` first fills a temporary the size of the result)."""
    out = aligned_empty((int(np.count_nonzero(mask)), *A.shape[1:]), A.dtype)
    step, dst = _piece(A), 0
    for a in range(0, A.shape[0], step):
        part = A[a : a + step][mask[a : a + step]]
        out[dst : dst + part.shape[0]] = part
        dst += part.shape[0]
    return out


@dataclass(slots=True)
class TrainingData:
    train: Split
    val: Split | None
    scaler: Scaler
    info: DataInfo


def load_training_data(
    data_cfg,
    seed: int,
    comm: Communicator,
    log: Log,
    *,
    reproducible: bool = False,
    source=None,
    stats: Communicator | None = None,
) -> TrainingData:
    """Read this rank's block, split off validation rows, fit and apply the scaler.

    ``reproducible``: ranks read whole global row blocks and the scaler merges per-block
    statistics in block order, so everything is bitwise the same for any rank count.
    ``source``: rows already in memory (``memory.ArraySource``) instead of ``data_cfg.train``
    (a file, or shards: global row numbers run across the files, so the split and the blocks are
    those of one file holding the same rows).
    ``stats``: the ranks the scaler is fitted over when not ``comm`` (federated clients read
    their own files alone, yet share one scaler).
    """
    if source is not None:
        block: Block = source.read_block(
            comm, log, nonfinite=data_cfg.nonfinite, aligned=reproducible
        )
    else:
        block = read_block(
            data_cfg.train,
            data_cfg.x,
            data_cfg.y,
            comm,
            log,
            nonfinite=data_cfg.nonfinite,
            aligned=reproducible,
        )
    assert block.y is not None
    holds_out = data_cfg.validation_fraction > 0 or bool(data_cfg.folds)
    X, y, ids = block.X, block.y, block.ids  # every row trains unless some are held out
    kept = None
    val_rows = None
    if holds_out:
        hold = held_out(block, data_cfg, seed)
        Xv, yv = gather_rows(block.X, hold), block.y[hold]  # copied out before the compaction
        val_ids = _ids_where(block, hold)
        val_rows = (Xv, yv, val_ids)
        if hold.any():
            keep = np.logical_not(hold, out=hold)  # the mask's own bytes: one byte a row less
            # Row ids cost 8 bytes a row: where nothing needs them now, the mask says it all.
            ids = _ids_where(block, keep) if block.ids is not None else None
            kept = None if ids is not None else keep
            X, y = compact_rows(block.X, keep), compact_rows(block.y, keep)
        del hold
    blocks = None
    if reproducible:
        br = global_block_rows(block.info.n_rows)
        blocks = block_ids(block.start, X.shape[0], ids, kept, br, block.info.n_rows)
    scaler = fit_scaler(data_cfg.scale, X, stats or comm, blocks)
    # The block is this function's own fresh buffer: it is scaled in place, not copied.
    train = make_split(scaler.apply_(X), y, comm, block.start, ids)
    train.kept, train.blocks = kept, blocks
    val = None
    if val_rows is not None:
        Xv, yv, val_ids = val_rows
        val = make_split(scaler.apply_(Xv), yv, comm, block.start, val_ids)
    return TrainingData(train, val, scaler, block.info)


def load_eval_data(
    path: str | list[str],
    x: str,
    y: str | None,
    scaler: Scaler,
    comm: Communicator,
    log: Log,
    nonfinite: str = "error",
) -> tuple[Split, DataInfo]:
    """Rows of a test or prediction file (or shards: a glob pattern or a list of files, read as
    their concatenation), scaled with the training statistics.

    Rows of another width are returned unscaled, for the caller's ``check_features`` to refuse.
    """
    block = read_block(path, x, y, comm, log, nonfinite=nonfinite)
    ys = block.y if block.y is not None else np.zeros(block.n)
    fits = block.info.n_features == scaler.shift.size
    X = scaler.apply_(block.X) if fits else block.X  # the block read here: scaled in place
    return make_split(X, ys, comm, block.start, block.ids), block.info

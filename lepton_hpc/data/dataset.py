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
from .reader import Block, DataInfo, global_block_rows, read_block, row_ids, take_rows

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

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def rows(self) -> np.ndarray:
        """Global row ids in the file (built when asked for)."""
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
) -> TrainingData:
    """Read this rank's block, split off validation rows, fit and apply the scaler.

    ``reproducible``: ranks read whole global row blocks and the scaler merges per-block
    statistics in block order, so everything is bitwise the same for any rank count.
    ``source``: rows already in memory (``memory.ArraySource``) instead of ``data_cfg.train``
    (a file, or shards: global row numbers run across the files, so the split and the blocks are
    those of one file holding the same rows).
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
    if holds_out:  # row ids are built only here and in reproducible mode
        rows = block.rows
        hold = validation_mask(
            rows, data_cfg.validation_fraction, seed, data_cfg.folds, data_cfg.fold
        )
        if hold.any():
            keep = ~hold
            X, y, ids = take_rows(block.X, keep), block.y[keep], rows[keep]
    blocks = None
    if reproducible:
        blocks = row_ids(block.start, X.shape[0], ids) // global_block_rows(block.info.n_rows)
    scaler = fit_scaler(data_cfg.scale, X, comm, blocks)
    train = make_split(scaler.apply(X), y, comm, block.start, ids)
    val = None
    if holds_out:
        Xv = take_rows(block.X, hold)
        val = make_split(scaler.apply(Xv), block.y[hold], comm, block.start, rows[hold])
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
    X = scaler.apply(block.X) if fits else block.X
    return make_split(X, ys, comm, block.start, block.ids), block.info

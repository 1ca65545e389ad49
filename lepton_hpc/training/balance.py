"""Speed-proportional load balancing of the training rows (``data.balance = "speed"``).

Every rank starts with the even split of the file's rows (``data.reader.row_block``, or whole
global blocks in reproducible mode: ``aligned_row_block``). At the end of an epoch the loop hands
``Balancer.after_epoch`` each rank's step work of that epoch and its training rows, a list every
rank holds identically (one allgather in ``Loop._epoch_timing``), so every rank takes the same
decision from the same numbers:

- when: after the first epoch of the process (the calibration), and after any later epoch whose
  slowest rank's step work is more than ``DRIFT`` (10 %) above the mean;
- what: each rank's speed (training rows per second of step work, summed over the last
  ``WINDOW`` epochs, whatever partition each ran with: a rank's speed does not depend on its
  rows, and one epoch's timing of a short step is noisy) and new contiguous ranges of file rows
  in proportion to it (reproducible mode: whole global blocks, at least one each; the
  default mode: rows, at least one each);
- whether: only when the predicted slowest rank's step time improves by more than ``GAIN``
  (10 %).

A move keeps the rows of a rank's old range that stay in its new one and reads from the file
only the rows it gains, through the initial load's pipeline (non-finite rows as
``data.nonfinite``, the validation hold-out by global row, the fitted scaler; shards as one
file). Validation rows stay where they are. The rows of every rank stay in ascending file order,
so in reproducible mode each global block's partial sums are the same bits whoever computes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..comm.base import agree
from ..cores import default_threads
from ..data.dataset import Split, block_ids, held_out, make_split
from ..data.reader import (
    DIRECT_READ,
    Block,
    aligned_empty,
    aligned_row_block,
    check_identities,
    global_block_rows,
    read_range,
    row_block,
)
from ..errors import DataError

DRIFT = 1.10  # the slowest rank's step work above the mean by more than this: balance again
GAIN = 0.10  # re-partition only when the predicted slowest step time improves by more than this
WINDOW = 5  # epochs of timings a speed is measured over


def proportional_cuts(units: int, weights: Sequence[float], minimum: int) -> list[int]:
    """Cuts ``0 = c[0] <= ... <= c[p] = units``: rank r gets units ``[c[r], c[r+1])``, in
    proportion to ``weights`` (rounded), at least ``minimum`` each when there are enough."""
    p = len(weights)
    total = float(sum(weights))
    cuts, cum = [0], 0.0
    for r in range(1, p):
        cum += weights[r - 1]
        cuts.append(min(units, round(units * cum / total)))
    cuts.append(units)
    if units >= minimum * p:
        for r in range(1, p):
            cuts[r] = max(cuts[r], cuts[r - 1] + minimum)
        for r in range(p - 1, 0, -1):
            cuts[r] = min(cuts[r], cuts[r + 1] - minimum)
    return cuts


@dataclass(frozen=True, slots=True)
class Decision:
    """A re-partition: every rank's old and new file-row ranges and the predicted step times."""

    old: tuple[tuple[int, int], ...]
    new: tuple[tuple[int, int], ...]
    time_old: float
    time_new: float


def speeds(works: Sequence[float], rows: Sequence[float]) -> list[float] | None:
    """Training rows per second of step work of each rank; a rank without rows or time gets
    the median of the others (None: no rank measured anything)."""
    known = [n / w for w, n in zip(works, rows, strict=True) if n > 0 and w > 0]
    if not known:
        return None
    fill = float(np.median(known))
    return [n / w if n > 0 and w > 0 else fill for w, n in zip(works, rows, strict=True)]


def window_speeds(history: Sequence[tuple[Sequence[float], Sequence[int]]]) -> list[float] | None:
    """``speeds`` of the rows and step work summed over the epochs of ``history``."""
    works = [sum(col) for col in zip(*(w for w, _ in history), strict=True)]
    rows = [float(sum(col)) for col in zip(*(n for _, n in history), strict=True)]
    return speeds(works, rows)


def decide(
    ranges: Sequence[tuple[int, int]],
    speed: Sequence[float] | None,
    rows: Sequence[int],
    n_file_rows: int,
    block_rows: int | None,
) -> Decision | None:
    """New ranges in proportion to the ranks' speeds (training rows per second), or None when
    the predicted slowest step time with the ranks' current ``rows`` does not improve by more
    than ``GAIN`` (or nothing changes). ``block_rows``: whole global blocks of that many rows
    (reproducible mode); None: rows."""
    if speed is None:
        return None
    p = len(ranges)
    if block_rows is None:
        cuts = proportional_cuts(n_file_rows, speed, 1)
    else:
        n_blocks = -(-n_file_rows // block_rows)
        cuts = [min(c * block_rows, n_file_rows) for c in proportional_cuts(n_blocks, speed, 1)]
    new = tuple((cuts[r], cuts[r + 1]) for r in range(p))
    if new == tuple(ranges):
        return None
    density = sum(rows) / max(n_file_rows, 1)  # training rows per file row
    time_old = max(n / s for n, s in zip(rows, speed, strict=True))
    time_new = max((b - a) * density / s for (a, b), s in zip(new, speed, strict=True))
    if not time_new < (1.0 - GAIN) * time_old:
        return None
    return Decision(tuple(ranges), new, time_old, time_new)


def even_ranges(n_file_rows: int, size: int, reproducible: bool) -> list[tuple[int, int]]:
    """Every rank's range of the initial even split (``reader.rank_rows`` for each rank)."""
    if not reproducible:
        return [row_block(n_file_rows, r, size) for r in range(size)]
    br = global_block_rows(n_file_rows)
    return [aligned_row_block(n_file_rows, r, size, br) for r in range(size)]


class Balancer:
    """``data.balance = "speed"`` for one run: decides after each epoch, moves rows."""

    def __init__(self, setup, ctx) -> None:
        self.setup, self.ctx = setup, ctx
        self.comm, self.log = setup.comm, setup.log
        info = setup.data.info
        self.reproducible = bool(setup.cfg.comm.reproducible)
        self.n_file_rows = info.n_rows
        self.block_rows = global_block_rows(info.n_rows) if self.reproducible else None
        self.ranges = even_ranges(info.n_rows, self.comm.size, self.reproducible)
        self.calibrated = False
        self.moves = 0
        # the last epochs' (step work, training rows) of every rank
        self.history: deque[tuple[list[float], list[int]]] = deque(maxlen=WINDOW)

    def after_epoch(self, epoch: int, works: Sequence[float], rows: Sequence[int]) -> bool:
        """Balance after ``epoch`` (1-based) given every rank's step work and training rows
        (the same lists on every rank); True when the rows moved."""
        if self.comm.size == 1:
            return False
        self.history.append((list(works), list(rows)))
        mean = sum(works) / len(works)
        due = not self.calibrated or max(works) > DRIFT * mean
        self.calibrated = True
        if not due:
            return False
        speed = window_speeds(self.history)
        decision = decide(self.ranges, speed, rows, self.n_file_rows, self.block_rows)
        if decision is None:
            return False
        self.move(decision.new[self.comm.rank])
        self.ranges = list(decision.new)
        self.moves += 1
        new_rows = [int(n) for n in self.comm.allgather(self.setup.data.train.n)]
        shown = ", ".join(f"{w:.3g}" for w in works)
        fast = ", ".join(f"{v:.3g}" for v in speed or ())
        self.log.info(
            f"data.balance: re-partitioned the training rows by speed after epoch {epoch}: "
            f"rows per rank {list(map(int, rows))} -> {new_rows} (step work [{shown}] s, "
            f"speeds [{fast}] rows/s; "
            f"predicted slowest rank {decision.time_old:.3g} s -> {decision.time_new:.3g} s)"
        )
        return True

    # ---- the move ---------------------------------------------------------------------------
    def move(self, new: tuple[int, int]) -> None:
        """Keep the rows of the old range that stay, read the rows gained, rebuild the training
        arrays and what holds them (the RunSetup's placed arrays, the reduction's blocks)."""
        s, comm = self.setup, self.comm
        train = s.data.train
        old_start, old_stop = self.ranges[comm.rank]
        start, stop = new
        rows = train.rows
        lo, hi = max(start, old_start), min(stop, old_stop)
        a = int(np.searchsorted(rows, lo)) if lo < hi else 0
        b = int(np.searchsorted(rows, hi)) if lo < hi else 0
        if lo < hi:
            before = (start, min(stop, old_start))
            after = (max(start, old_stop), stop)
        else:
            before, after = (start, stop), (stop, stop)
        gained = agree(comm, lambda: [self._read(*before), self._read(*after)])
        (Xb, yb, ib), (Xa, ya, ia) = gained
        X_keep, y_keep, i_keep = train.X[a:b], train.y[a:b], np.asarray(rows[a:b], np.int64)
        m = Xb.shape[0] + (b - a) + Xa.shape[0]
        X = aligned_empty((m, *train.X.shape[1:]), train.X.dtype)
        y = np.empty((m, *train.y.shape[1:]), dtype=train.y.dtype)
        ids = np.empty(m, dtype=np.int64)
        at = 0
        for Xp, yp, ip in ((Xb, yb, ib), (X_keep, y_keep, i_keep), (Xa, ya, ia)):
            k = Xp.shape[0]
            X[at : at + k], y[at : at + k], ids[at : at + k] = Xp, yp, ip
            at += k
        del X_keep, y_keep, i_keep, gained, Xb, yb, Xa, ya
        n_global = train.n_global
        # Drop the old arrays (and their placed copies) before placing the new ones.
        s.X = s.y = None
        split: Split = make_split(X, y, comm, start, ids)
        if split.n_global != n_global:  # every rank sees the same sum: all raise together
            raise DataError(
                f"re-partitioning the training rows found {split.n_global} rows, not "
                f"{n_global}: the data file changed during the run?"
            )
        if self.block_rows is not None:
            split.blocks = block_ids(0, m, ids, None, self.block_rows, self.n_file_rows)
            self.ctx.reduction.set_blocks(split.blocks)
        s.data.train = split
        s.X, s.y = s.device.place(split.X), s.device.place(split.y)

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training rows of file rows ``[start, stop)``: read, screened for NaN/Inf, the
        validation rows held out, scaled (the initial load's pipeline for these rows)."""
        s = self.setup
        info, cfg, train = s.data.info, s.cfg, s.data.train
        m = max(0, stop - start)
        X = aligned_empty((m, info.n_features), train.X.dtype)
        y = np.empty((m, *train.y.shape[1:]), dtype=np.float64)
        if m == 0:
            return X, y, np.zeros(0, dtype=np.int64)
        bad = np.zeros(m, dtype=bool)
        direct = DIRECT_READ
        if direct:
            check_identities(info, start, stop)  # the very files rank 0 inspected
        read_range(info, start, stop, default_threads(self.comm), direct, X, y, bad)
        ids = np.arange(start, stop, dtype=np.int64)
        if bad.any():
            if cfg.data.nonfinite != "drop":
                raise DataError(
                    f"'{info.path}': row {int(ids[np.argmax(bad)])} holds NaN or Inf (read "
                    "again to re-partition the training rows: the file changed during the run?)"
                )
            keep = ~bad
            X, y, ids = X[keep], y[keep], ids[keep]
        if cfg.data.validation_fraction > 0 or cfg.data.folds:
            hold = held_out(Block(X, y, info, start, ids), cfg.data, cfg.train.seed)
            keep = ~hold
            X, y, ids = X[keep], y[keep], ids[keep]
        if not (X.flags.c_contiguous and X.ctypes.data % 64 == 0):
            Xc = aligned_empty(X.shape, X.dtype)
            Xc[...] = X
            X = Xc
        return s.data.scaler.apply_(X), y, ids

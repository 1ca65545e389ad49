"""Training on rows streamed from the file: for data larger than the memory of the nodes.

With ``data.stream = true`` a rank never holds its rows. Every pass (a full-batch gradient, the
epoch's metrics) reads the rank's rows again, ``data.buffer_mb`` at a time, into one of two
buffers it owns: while the kernel works on one piece, a background thread reads the next into
the other (plain ``pread``, chunk decoding, or h5py opened by this process alone: no collective
call leaves the main thread). Each piece is screened for NaN/Inf, split into training and
validation rows by the same hash of the global row id as in memory, and scaled in place.

A first pass fits what in-memory training fits on the loaded block: the scaler (per-block
z-score moments in reproducible mode, per-piece moments merged in order otherwise; minima and
maxima), the targets' range and their exact sums (regression metrics need the mean), the row
counts, and the NaN/Inf check.

Bit for bit: in reproducible mode the pieces are whole global blocks, so each block's partial
gradient and moments are computed from the same rows in the same order as in memory, and the
block-ordered sum is the same: streamed full-batch and L-BFGS runs give the in-memory bits.
Metrics are integer counts and exact sums, equal in any mode. In the default mode the pieces'
float64 gradients are added in piece order: equal to in-memory results to rounding.

Rows used as stored (no scaler, no hold-out; X contiguous in its file, in the training dtype)
are mapped instead of read: each piece is a read-only view of the file's pages
(``reader.map_range``), and the kernel reads the page cache itself. Pieces whose pages are
cached (``direct_read.cached``) are mapped by the caller's thread when it asks for them; others
are mapped (and screened in the first pass) ahead by the background thread. Each file is
mapped once (``direct_read.FileMap``); mapping a piece maps its pages into the process, and
the pages of the piece two before are let go then, so at most two pieces are mapped at once,
and a piece is a buffer. Those pieces start on 2 MiB boundaries of the file
(``reader.mapped_bounds``). Pieces where the first pass found NaN/Inf rows, and pieces spanning
two shards, are read into the buffers as before.

Memory: two pieces of ``buffer_mb`` (rows, targets, flags), plus the validation rows of one
piece while metrics are computed, plus the model. ``results.json`` reports each rank's peak.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..comm.base import Communicator, agree
from ..errors import DataError, LeptonError
from ..exact import ExactSums
from .batches import BatchGather, EpochBatches, permute
from .dataset import _ids_where, compact_rows, gather_rows, held_out, validation_mask
from .direct_read import FileMap, nonfinite_rows
from .preprocess import Scaler, block_moments, local_moments, merge_moments
from .reader import (
    DIRECT_READ,
    MAP_ALIGN,
    MAP_READ,
    Block,
    MappedPiece,
    _feature_dtype,
    _reader_threads,
    aligned_empty,
    check_identities,
    global_block_rows,
    inspect_shared,
    map_range,
    mapped_bounds,
    mapped_cached,
    nonfinite_error,
    rank_rows,
    read_range,
)


@dataclass(slots=True)
class Part:
    """Rows of one piece: features (scaled), targets and their global row ids (``ids`` None:
    the rows ``start..start + n``, made only when asked for)."""

    X: np.ndarray
    y: np.ndarray
    _ids: np.ndarray | None = None
    start: int = 0

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.arange(self.start, self.start + self.n, dtype=np.int64)
        return self._ids


@dataclass(slots=True)
class StreamSplit:
    """A split of streamed rows: counts only (the rows stay in the file)."""

    n: int  # rows on this rank
    n_global: int
    y_mean: np.ndarray | None = None  # exact global mean of each target column
    X: None = None
    y: None = None


@dataclass
class _Buffer:
    X: np.ndarray | None  # allocated when first needed: mapped pieces never need it
    y: np.ndarray | None
    bad: np.ndarray
    view: np.ndarray | None = None  # the piece's rows mapped from the file (read-only)
    y_view: np.ndarray | None = None  # and its targets, when stored as float64
    mapped: MappedPiece | None = None  # their pages, to be let go with the next piece here

    def let_go(self) -> None:
        """Let go of the mapped piece's pages (and of the views, which stay valid elsewhere)."""
        if self.mapped is not None:
            self.mapped.drop()
        self.view = self.y_view = self.mapped = None

    def rows(self, m: int) -> np.ndarray:
        return self.view if self.view is not None else self.X[:m]

    def targets(self, m: int) -> np.ndarray:
        if self.y_view is not None:
            return self.y_view
        return self.y[:m] if self.y is not None else np.zeros(m)


@dataclass
class _Fit:
    """What the first pass gathers on this rank."""

    n_train: int = 0
    n_val: int = 0
    bad: int = 0
    first_bad: int = -1
    moments: list = field(default_factory=list)
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    y_lo: float = np.inf
    y_hi: float = -np.inf
    y_nonint: bool = False
    y_train: ExactSums | None = None
    y_val: ExactSums | None = None
    block_counts: np.ndarray | None = None  # training rows of each global block of the rank


class RowStream:
    """This rank's rows of ``data_cfg.train``, read a piece at a time for every pass."""

    def __init__(
        self, data_cfg, seed: int, comm: Communicator, *, reproducible: bool = False
    ) -> None:
        self.cfg, self.seed, self.comm = data_cfg, seed, comm
        self.reproducible = reproducible
        info = self.info = inspect_shared(data_cfg.train, data_cfg.x, data_cfg.y, comm)
        self.start, self.stop = rank_rows(info, comm, reproducible)
        self.dtype = _feature_dtype(info.x_dtype)
        self.y_tail = tuple((info.y_shape or ())[1:])
        y_width = self.y_width = int(np.prod(self.y_tail, dtype=np.int64)) if self.y_tail else 1
        row_bytes = info.n_features * self.dtype.itemsize + 8 * y_width + 1
        rows = max(1, int(data_cfg.buffer_mb * 2**20) // row_bytes)
        self.block_rows = global_block_rows(info.n_rows)
        self.threads = _reader_threads(comm)
        self.direct = agree(comm, self._same_files)
        self.holds_out = data_cfg.validation_fraction > 0 or bool(data_cfg.folds)
        # Rows used as they are (no hold-out, no scaler) of a contiguous X stored in the
        # training dtype are mapped from the file, not copied: the kernel reads the page cache.
        # Mapped pieces are mapped by the caller's thread, one while the caller holds the last:
        # at most two at once, so they are a buffer each.
        self.map = (
            MAP_READ
            and self.direct
            and not self.holds_out
            and data_cfg.scale == "none"
            and all(
                s.x_offset is not None and np.dtype(s.x_dtype) == self.dtype
                for s in (info.shards or (info,))
            )
        )
        unit = self.block_rows if reproducible else 1
        if reproducible:  # whole global blocks per piece: each block's sums are those in memory
            rows = max(self.block_rows, rows // self.block_rows * self.block_rows)
        aligned = rows * info.n_features * self.dtype.itemsize // MAP_ALIGN * MAP_ALIGN
        self.bounds = (self.map and mapped_bounds(info, self.start, self.stop, unit, aligned)) or [
            (a, min(self.stop, a + rows)) for a in range(self.start, self.stop, rows)
        ]
        self.piece_rows = max((b - a for a, b in self.bounds), default=1)
        self.n_blocks = -(-info.n_rows // self.block_rows)
        first, last = self.start // self.block_rows, -(-self.stop // self.block_rows)
        self.rank_blocks = np.arange(first, max(first, last), dtype=np.int64)
        # Mini-batch windows: whole global blocks, about a buffer of rows per rank. Reproducible
        # mode sizes them from the file and the buffer alone, so they never depend on the rank
        # count (with more ranks each holds less of a window).
        share = rows if reproducible else rows * comm.size
        self.window_blocks = max(1, share // self.block_rows)
        self.scaler: Scaler | None = None
        self.place: Callable = lambda a: a  # the device's ``place`` once chosen
        self._buffers: list[_Buffer] = []
        self.fitted = _Fit()
        # Pieces holding NaN/Inf rows (found by the first pass): read into a buffer, not mapped
        self._bad_pieces = np.zeros(len(self.bounds), dtype=bool)
        self._screened = False  # whether the first pass has screened every piece
        # Mapped pieces: one mapping and descriptor per file for the run (its read-ahead
        # state grows to huge-page folios), closed with the stream
        self._maps: dict[str, FileMap] = {}
        self._all_cached = False  # every mapped piece of this pass was in the page cache
        weakref.finalize(self, _close_all, self._maps)

    def describe(self) -> str:
        """One line for the run's log: how later passes read the rows."""
        n = len(self.bounds)
        mib = self.piece_rows * self.info.n_features * self.dtype.itemsize / 2**20
        how = "read into two buffers each pass"
        if self.map:
            how = "mapped from the file each pass (no copy)"
            if self._bad_pieces.any():
                how += f", but {int(self._bad_pieces.sum())} holding NaN/Inf rows are read"
        rank = self.comm.rank
        return f"data.stream: rank {rank}'s rows in {n} piece(s) of up to {mib:.1f} MiB, {how}"

    # ---- reading ------------------------------------------------------------------------
    def _same_files(self) -> bool:
        check_identities(self.info, self.start, self.stop)
        return DIRECT_READ

    def buffer_bytes(self) -> int:
        """Bytes of rows and targets the stream holds at most: its two buffers (the first pass
        reads into them) or, when the rows are mapped, two mapped pieces."""
        x_row = self.info.n_features * self.dtype.itemsize
        y_row = 8 * self.y_width if self.info.y is not None else 0
        held = 2 * self.piece_rows * (x_row + y_row)
        return held if self._screened else 0

    def release(self) -> None:
        """Let go of the buffers, mapped pages and the files (a later pass makes them again)."""
        for buf in self._buffers:
            buf.let_go()
        self._buffers.clear()
        _close_all(self._maps)

    def _buffer(self, k: int) -> _Buffer:
        while len(self._buffers) < 2:
            m = self.piece_rows
            y = None if self.info.y is None else np.empty((m, *self.y_tail), dtype=np.float64)
            self._buffers.append(_Buffer(None, y, np.zeros(m, dtype=bool)))
        return self._buffers[k % 2]

    def _rows_buffer(self, buf: _Buffer) -> np.ndarray:
        if buf.X is None:
            buf.X = aligned_empty((self.piece_rows, self.info.n_features), self.dtype)
        return buf.X

    def _read(self, k: int) -> tuple[int, int, _Buffer]:
        """Piece ``k``: its rows mapped from the file (no copy) where they can be, else read
        into the buffer; its targets read, and NaN/Inf flagged (in mapped rows, only in the
        first pass: it finds which pieces hold any, and those are read from then on)."""
        a, b = self.bounds[k]
        buf = self._buffer(k)
        buf.let_go()  # the buffer's last piece (k - 2): at most two pieces are mapped
        m = b - a
        bad = buf.bad[:m]
        bad[:] = False
        y = None if buf.y is None else buf.y[:m]
        mapped = None
        if self.map and not self._bad_pieces[k]:
            self._forget_others()
            mapped = map_range(self.info, a, b, self.direct, self.dtype, self.y_width, self._maps)
        if mapped is None:
            X = self._rows_buffer(buf)[:m]
            read_range(self.info, a, b, self.threads, self.direct, X, y, bad)
            return a, b, buf
        buf.mapped, buf.view, y_view = mapped, mapped.X, mapped.y
        if y_view is not None:
            buf.y_view = y_view.reshape(m, *self.y_tail)
        elif y is not None:
            read_range(self.info, a, b, self.threads, self.direct, None, y, bad)
        if not self._screened:
            nonfinite_rows(buf.view, out=bad)
            if y_view is not None:
                nonfinite_rows(y_view, out=bad)
        return a, b, buf

    def _forget_others(self) -> None:
        """Shards: the mappings of files no held piece is in are let go (a mapping a file
        would otherwise stay for the run; their descriptors do)."""
        if len(self._maps) <= 2:
            return
        held = {fmap.path for buf in self._buffers if buf.mapped for fmap, _, _ in buf.mapped.spans}
        for path, fmap in self._maps.items():
            if path not in held:
                fmap.forget()

    def pieces(self) -> Iterator[tuple[int, int, _Buffer]]:
        """(first row, end row, buffer) of each piece in order; the next piece is read on a
        background thread while the caller works on this one. A piece is valid until the
        next is asked for (its buffer is then refilled). Its rows are ``buffer.rows(m)``:
        read-only when mapped from the file."""
        if not self.bounds:
            return
        self._all_cached = bool(self.map) and bool(
            mapped_cached(self.info, self.start, self.stop, self.dtype, self.y_width, self._maps)
        )
        with ThreadPoolExecutor(1, thread_name_prefix="lepton-read") as pool:
            ahead = self._ahead(pool, 0)
            for k in range(len(self.bounds)):
                piece = ahead()
                if k + 1 < len(self.bounds):
                    ahead = self._ahead(pool, k + 1)
                yield piece

    def _ahead(self, pool: ThreadPoolExecutor, k: int) -> Callable[[], tuple]:
        """Piece k's read, to be waited for with the returned call: on ``pool``'s thread, while
        the caller works on the piece before, unless the piece is mapped from pages already
        cached (``reader.mapped_cached``). Those are mapped by the caller's thread when it asks
        for them: mapping cached pages is cheap (0.1-0.5 ms a piece), and done on the read-ahead
        thread it takes a core from the kernel's threads, which then wait for it. Pages that
        must come from the device are read (mapped, and screened in the first pass) ahead on
        the thread, as the reads into buffers are. One ``cachestat`` call for the rank's rows
        at the pass's start spares one a piece when all of them are cached. Either way at most
        two pieces are mapped at once: mapping a piece lets go of the piece two before.

        Measured (4M x 32 float32, 1 rank, the streamed epoch from the page cache against the
        in-memory one, alternating runs): 1.19-1.24x with one mapping of the file for the run,
        against 1.26-1.34x with a mapping a piece, 1.34-1.37x with pieces of two thirds of a
        buffer (three mapped at once) and 1.33-1.44x with every piece mapped on the thread."""
        if self.map and not self._bad_pieces[k]:
            a, b = self.bounds[k]
            if self._all_cached or mapped_cached(
                self.info, a, b, self.dtype, self.y_width, self._maps
            ):
                return functools.partial(self._read, k)
        return pool.submit(self._read, k).result

    def _masks(self, a: int, b: int, buf: _Buffer) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(training rows, validation rows or None) of the piece ``[a, b)``; training rows None:
        every row."""
        m = b - a
        drop = self.cfg.nonfinite == "drop" and bool(buf.bad[:m].any())
        usable = ~buf.bad[:m] if drop else None
        if not self.holds_out:
            return usable, None
        hold = held_out(Block(buf.rows(m), None, self.info, a), self.cfg, self.seed)
        train = ~hold if usable is None else usable & ~hold
        return train, (hold if usable is None else usable & hold)

    def read_blocks(self, blocks: np.ndarray) -> Part:
        """The training rows of global ``blocks`` (ascending) that lie on this rank, read into
        a new buffer, screened, split and scaled (a mini-batch window)."""
        br = self.block_rows
        runs = []  # row ranges [a, b) of consecutive blocks, clipped to the rank's rows
        for b in blocks.tolist():
            a, z = max(b * br, self.start), min((b + 1) * br, self.stop)
            if runs and runs[-1][1] == a:
                runs[-1][1] = z
            elif a < z:
                runs.append([a, z])
        m = sum(z - a for a, z in runs)
        X = aligned_empty((m, self.info.n_features), self.dtype)
        y = np.empty((m, *self.y_tail), dtype=np.float64) if self.info.y is not None else None
        bad = np.zeros(m, dtype=bool)
        ids = np.empty(m, dtype=np.int64)
        at = 0
        for a, z in runs:
            k = z - a
            ys = None if y is None else y[at : at + k]
            read_range(
                self.info, a, z, self.threads, self.direct, X[at : at + k], ys, bad[at : at + k]
            )
            ids[at : at + k] = np.arange(a, z, dtype=np.int64)
            at += k
        keep = ~bad if self.cfg.nonfinite == "drop" else np.ones(m, dtype=bool)
        if self.holds_out:
            c = self.cfg
            keep &= ~validation_mask(ids, c.validation_fraction, self.seed, c.folds, c.fold)
        y = y if y is not None else np.zeros(m)
        if not keep.all():
            X, y, ids = compact_rows(X, keep), compact_rows(y, keep), ids[keep]
        if self.scaler is not None:
            self.scaler.apply_(X)
        return Part(X, y, ids)

    def _parts(self, a: int, b: int, buf: _Buffer, want_val: bool) -> tuple[Part, Part | None]:
        """The piece's training rows (compacted in place in the buffer, or into it from mapped
        rows) and, if asked for, a copy of its validation rows; both scaled when the scaler is
        fitted."""
        m = b - a
        X, y = buf.rows(m), buf.targets(m)
        train, val = self._masks(a, b, buf)
        vpart = None
        if want_val and val is not None:
            vpart = Part(gather_rows(X, val), y[val], _ids_where(Block(X, y, self.info, a), val))
        if train is None:
            tpart = Part(X, y, None, a)
        else:
            ids = _ids_where(Block(X, y, self.info, a), train)
            into = X if X.flags.writeable else self._rows_buffer(buf)
            y_into = y if y.flags.writeable else buf.y  # mapped targets: into the buffer
            tpart = Part(compact_rows(X, train, into), compact_rows(y, train, y_into), ids)
        if self.scaler is not None and self.scaler.kind != "none":
            if not tpart.X.flags.writeable:
                tpart.X = self.scaler._scale_into(tpart.X, self._rows_buffer(buf)[: tpart.n])
            else:
                self.scaler.apply_(tpart.X)
            if vpart is not None:
                self.scaler.apply_(vpart.X)
        return tpart, vpart

    def passes(self, want_val: bool = False) -> Iterator[tuple[Part, Part | None]]:
        """Every piece's (training part, validation part): one pass over the rank's rows.

        Errors are made collective: a rank whose read fails keeps the pass going (with no rows)
        and every rank raises the same error at the end, so no rank is left waiting."""
        error: LeptonError | None = None
        try:
            for a, b, buf in self.pieces():
                yield self._parts(a, b, buf, want_val)
        except (LeptonError, OSError) as exc:
            error = self._failure(exc)
        self._together(error)

    def _failure(self, exc: LeptonError | OSError) -> LeptonError:
        if isinstance(exc, LeptonError):
            return exc
        return DataError(f"'{self.info.path}' cannot be read ({exc})")

    def _together(self, error: LeptonError | None) -> None:
        """After a pass: every rank raises the error of the lowest failing rank, if any."""

        def check() -> None:
            if error is not None:
                raise error

        agree(self.comm, check)

    # ---- the first pass -----------------------------------------------------------------
    def fit(self) -> tuple[StreamSplit, StreamSplit | None, Scaler, tuple[float, float, bool]]:
        """Read every row once: counts, NaN/Inf check, scaler, target range and sums.

        Returns (train split, validation split or None, scaler, target stats) with the same
        values on every rank."""
        f = self.fitted = _Fit()
        kind = self.cfg.scale
        d = self.info.n_features
        y_cols = int(np.prod(self.y_tail, dtype=np.int64)) if self.y_tail else 1
        f.y_train, f.y_val = ExactSums(y_cols), ExactSums(y_cols)
        f.block_counts = np.zeros(self.rank_blocks.size, dtype=np.int64)
        has_y = self.info.y is not None
        error: LeptonError | None = None
        try:
            for k, (a, b, buf) in enumerate(self.pieces()):
                m = b - a
                bad = buf.bad[:m]
                if bad.any():
                    self._bad_pieces[k] = True
                    f.bad += int(np.count_nonzero(bad))
                    if f.first_bad < 0:
                        f.first_bad = a + int(np.argmax(bad))
                    if self.cfg.nonfinite == "error":
                        continue  # the run fails after the pass; nothing more to learn
                train, val = self._parts(a, b, buf, want_val=True)
                f.n_train += train.n
                at = train.ids // self.block_rows - self.rank_blocks[0]
                f.block_counts += np.bincount(at, minlength=f.block_counts.size)
                if val is not None:
                    f.n_val += val.n
                    if has_y and val.n:
                        f.y_val.add(list(val.y.reshape(val.n, -1).T))
                if train.n == 0:
                    continue
                if kind == "zscore":
                    if self.reproducible:
                        f.moments += block_moments(train.X, train.ids // self.block_rows)
                    else:
                        f.moments.append(local_moments(train.X))
                elif kind == "minmax":
                    lo = train.X.min(axis=0).astype(np.float64)
                    hi = train.X.max(axis=0).astype(np.float64)
                    f.lo = lo if f.lo is None else np.minimum(f.lo, lo)
                    f.hi = hi if f.hi is None else np.maximum(f.hi, hi)
                if has_y:
                    y = train.y
                    f.y_lo, f.y_hi = min(f.y_lo, float(y.min())), max(f.y_hi, float(y.max()))
                    f.y_nonint |= bool(np.any(y != np.round(y)))
                    f.y_train.add(list(y.reshape(train.n, -1).T))
        except (LeptonError, OSError) as exc:
            error = self._failure(exc)
        self._together(error)
        self._screened = True
        self._check_nonfinite()
        comm = self.comm
        counts = comm.allreduce_(np.array([f.n_train, f.n_val], dtype=np.int64))
        n_train, n_val = int(counts[0]), int(counts[1])
        scaler = self._scaler(kind, d)
        lo, hi = np.array([f.y_lo]), np.array([f.y_hi])
        comm.allreduce_min_(lo)
        comm.allreduce_max_(hi)
        nonint = comm.allreduce_(np.array([int(f.y_nonint)], dtype=np.int64))
        stats = (float(lo[0]), float(hi[0]), bool(nonint[0] == 0))
        y_train = f.y_train.total(comm) / max(n_train, 1)
        y_val = f.y_val.total(comm) / max(n_val, 1)
        train = StreamSplit(f.n_train, n_train, y_train)
        val = StreamSplit(f.n_val, n_val, y_val) if self.holds_out else None
        self.scaler = scaler
        return train, val, scaler, stats

    def _check_nonfinite(self) -> None:
        """As in memory: NaN or Inf rows are an error naming the first one, unless dropped."""
        comm, f = self.comm, self.fitted
        bad = int(comm.allreduce_(np.array([f.bad], dtype=np.int64))[0])
        if bad == 0 or self.cfg.nonfinite == "drop":
            return
        raise nonfinite_error(self.info, bad, f.first_bad, comm)

    def _scaler(self, kind: str, d: int) -> Scaler:
        """The scaler from the first pass's statistics: the in-memory fit's merge."""
        comm, f = self.comm, self.fitted
        if kind == "none":
            return Scaler.identity(d)
        if kind == "zscore":
            parts = [p for rank in comm.allgather(f.moments) for p in rank]
            n, mean, m2 = merge_moments(parts or [(0, np.zeros(d), np.zeros(d))])
            std = np.sqrt(m2 / max(n, 1))
            return Scaler(kind, mean, np.where(std > 0, std, 1.0))
        lo = np.full(d, np.inf) if f.lo is None else f.lo.copy()
        hi = np.full(d, -np.inf) if f.hi is None else f.hi.copy()
        comm.allreduce_min_(lo)
        comm.allreduce_max_(hi)
        span = hi - lo
        return Scaler(kind, lo, np.where(span > 0, span, 1.0))


def _close_all(maps: dict[str, FileMap]) -> None:
    for fmap in maps.values():
        fmap.close()
    maps.clear()


WINDOW_STREAM = 0x5EED  # keys the epoch's assignment of blocks to windows apart from batches


class StreamBatches:
    """The mini-batches of one epoch over streamed rows: the streaming shuffle.

    Each epoch a seeded permutation of the file's global blocks (keyed by the seed and the
    epoch) deals them into windows of ``window_blocks`` blocks; the windows are visited in
    order. A rank reads its rows of a window's blocks (scattered over its part of the file),
    the next window being read on a background thread meanwhile; inside a window the rows are
    ordered by a second seeded permutation of their position among the window's rows of every
    rank (ascending global row ids) and cut into batches of ``batch_size``, exactly as
    ``EpochBatches`` does for a whole file. A window's last batch may be short. Neither the
    windows nor the batches depend on the rank count, so reproducible mode gives the same bits
    for any number of ranks. Shuffling quality: rows of the same block (``global_block_rows``,
    up to 1024) share a window, the rest is mixed over the file.

    A sequence of the epoch's batches (local row positions in the current window); ``gather``
    copies a batch's rows. Batches are asked for in order (a resume starts anywhere).
    """

    def __init__(self, stream: RowStream, epoch: int, batch_size: int, seed: int, reduction):
        self.stream, self.epoch, self.batch_size, self.seed = stream, epoch, batch_size, seed
        self.reduction = reduction
        comm = stream.comm
        blocks, bpw = stream.rank_blocks, stream.window_blocks
        n_windows = max(1, -(-stream.n_blocks // bpw))
        window = permute(blocks, stream.n_blocks, seed ^ WINDOW_STREAM, epoch) // bpw
        counts = stream.fitted.block_counts
        local = np.bincount(window, weights=counts, minlength=n_windows).astype(np.int64)
        gathered = comm.allgather(local)
        table = np.array(gathered, dtype=np.int64).reshape(comm.size, n_windows)
        self.counts = table.sum(axis=0)  # training rows per window
        self.offsets = table[: comm.rank].sum(axis=0)  # of lower ranks, per window
        steps = -(-self.counts // max(1, batch_size))
        self.starts = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
        order = np.argsort(window, kind="stable")
        cuts = np.searchsorted(window[order], np.arange(n_windows + 1))
        self.blocks = [blocks[order[cuts[j] : cuts[j + 1]]] for j in range(n_windows)]
        self.current = -1
        self.batches: list[np.ndarray] = []
        self._gather: BatchGather | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lepton-read")
        self._ahead: tuple[int, object] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, k: int) -> np.ndarray:
        j = int(np.searchsorted(self.starts, k, side="right")) - 1
        if j != self.current:
            self._load(j)
        return self.batches[k - int(self.starts[j])]

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._gather is not None
        return self._gather(rows)

    def _read(self, j: int) -> Part:
        return self.stream.read_blocks(self.blocks[j])

    def _load(self, j: int) -> None:
        part = self._ahead[1].result() if self._ahead and self._ahead[0] == j else self._read(j)
        self._ahead = None
        later = [w for w in range(j + 1, len(self.blocks)) if self.counts[w]]
        if later:  # the next window with rows, read while this one trains
            self._ahead = (later[0], self._pool.submit(self._read, later[0]))
        self.current = j
        index = range(int(self.offsets[j]), int(self.offsets[j]) + part.n)
        seed = (self.seed * 1_000_003 + j) % 2**63
        self.batches = EpochBatches(index, int(self.counts[j]), self.batch_size, seed)(self.epoch)
        place = self.stream.place
        self._gather = BatchGather(place(part.X), place(part.y))
        if hasattr(self.reduction, "block"):  # reproducible mode: the window rows' blocks
            self.reduction.block = part.ids // self.stream.block_rows

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

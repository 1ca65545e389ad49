"""``lepton convert --shards N``: one input written as N HDF5 files by the ranks of the job.

Layout. ``--out DIR`` names a directory (created when absent, parents included; a symbolic link to
a directory is followed). Shard ``i`` is ``DIR/part-{i:05d}.h5``: five zero-padded digits, so the
names sort in row order and ``data.train = "DIR/part-*.h5"`` reads exactly the rows of the one-file
conversion, in the same order. Shard ``i`` holds the contiguous input rows
``[i*n//N + min(i, n%N), ...)``: sizes differ by at most one, the larger ones first (as
``data.reader.row_block`` cuts rows among ranks). Every shard is written contiguous (the layout
``lepton train`` reads with plain ``pread``s), with the attributes of a one-file conversion plus
``shard_index``, ``shard_count``, ``first_row`` and ``total_rows``. A shard needs a row, so ``N``
may not exceed the input's rows.

Ranks. Rank ``r`` of ``k`` writes the contiguous group of shards ``row_block(N, r, k)`` (ranks
beyond ``N`` write none), so each rank reads one contiguous range of the input:

- Parquet: the footers give each row group's rows; a rank reads only the groups holding its rows.
- NPY, and NPZ members stored uncompressed: memory-mapped and sliced. Compressed NPZ members are
  one deflate stream: a rank decompresses and drops the rows before its own.
- CSV: rank 0 reads the file once first, counting rows (and checking each row's cell count)
  and noting the byte offset where every ``CSV_MARK_ROWS``-th row starts; a rank seeks to the mark
  before its first row, skips the few rows up to it without parsing them, and parses its own.
  Messages name the same global row and file line as the one-file conversion.

Safety. Before anything is written, rank 0 checks the inputs and the directory and shares the
verdict: ``DIR`` may not be a file or an input directory; a non-empty ``DIR`` needs ``--force``.
``--force`` replaces only files named exactly as this command's shards (``part-00000.h5`` up to
``N - 1``); it never touches other files, except shards that an earlier ``lepton convert
--shards`` wrote beyond the new ``N`` (their attributes say so): those are removed once the new
shards are in place, because the pattern ``part-*.h5`` would otherwise read them as part of the
data. Any other file the pattern matches (``part-old.h5``, a ``part-00009.h5`` the toolkit did not
write) is refused, naming it, with or without ``--force``. A shard name that is an input (a
symbolic link to it, a hard link) is refused even with ``--force``.

Commit. Each rank writes its shards under temporary names (``.part-00003.h5.<host>.<pid>.tmp``,
which the pattern does not match); only when every rank has written all of its shards does each
rename its own into place. A failure on any rank (a bad cell, a full disk, a bug) is agreed by
all ranks, every temporary is removed, and a directory the command created is removed again: no
partial set of shards is left, an earlier set stays as it was, and no rank waits for another.
The renames themselves are not undone: a rename refused after another rank's succeeded (the
file system failing between renames in one directory) is reported, and leaves that mix.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from ..comm.base import CollectiveError, Communicator, agree
from ..errors import EXIT_FAILED, DataError, LeptonError
from ..log import Log
from ..safety import REFUSED, WriteError, check_not_input, commit, fsync_dir, same_path, temp_path
from .convert import describe, input_files, open_source, origin, write_table
from .sources import (
    Options,
    Source,
    _is_number,
    _target_index,
    open_csv,
    parse_cells,
    split_table,
)

__all__ = [
    "CSV_MARK_ROWS",
    "MAX_SHARDS",
    "SHARD_GLOB",
    "Plan",
    "convert_shards",
    "is_toolkit_shard",
    "shard_bounds",
    "shard_name",
]

SHARD_DIGITS = 5
MAX_SHARDS = 10**SHARD_DIGITS  # names keep five digits, so they sort in row order
SHARD_GLOB = "part-*.h5"
_SHARD_NAME = re.compile(r"part-(\d{5})\.h5")
CSV_MARK_ROWS = 4096  # rank 0's counting pass notes where every 4096th CSV row starts
CONVERTER = "lepton convert"
T = TypeVar("T")


def shard_name(index: int) -> str:
    return f"part-{index:0{SHARD_DIGITS}d}.h5"


def _block(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank`` among ``size`` (sizes differ by at most one, as
    ``data.reader.row_block``, which it repeats to keep this module free of the reader)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_bounds(n_rows: int, n_shards: int) -> list[int]:
    """The first row of each shard, and ``n_rows`` last (length ``n_shards + 1``)."""
    return [_block(n_rows, i, n_shards)[0] for i in range(n_shards)] + [n_rows]


def is_toolkit_shard(path: Path) -> bool:
    """``path`` is a shard an earlier ``lepton convert --shards`` wrote: a plain file (not a link)
    with a shard's name and the converter's shard attributes."""
    if not _SHARD_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return False
    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as fh:
            attrs = fh.attrs
            converter = attrs.get("converter")
            if isinstance(converter, bytes):
                converter = converter.decode()
            return converter == CONVERTER and "shard_count" in attrs and "shard_index" in attrs
    except (OSError, ValueError):
        return False


# ---- the plan: checks and row counts on rank 0, shared with every rank ----------------------
@dataclasses.dataclass(slots=True)
class _CsvLayout:
    """What the CSV reader of a shard needs to know of the file (from its first row)."""

    header: bool
    n_cols: int
    target: int | None
    names: list[str] | None


@dataclasses.dataclass(slots=True)
class Plan:
    """What rank 0 found, shared with every rank: inputs, rows, shard boundaries, directory."""

    srcs: list[Path]
    files: list[Path]
    kind: str
    out: Path
    bounds: list[int]
    created: bool  # rank 0 created ``out`` (removed again when the conversion fails)
    stale: list[Path]  # toolkit shards beyond the new count, removed after the commit
    summary: str
    csv: _CsvLayout | None = None
    # per shard: (byte offset, lines before it, rows to skip from there) of its first CSV row
    csv_starts: list[tuple[int, int, int]] | None = None

    @property
    def n_shards(self) -> int:
        return len(self.bounds) - 1


def _names(paths: Sequence[Path], limit: int = 4) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _check_out_dir(
    out: Path, srcs: Sequence[Path], files: Sequence[Path], n_shards: int, force: bool
) -> list[Path]:
    """Refuse a directory the shards may not go to; returns the stale toolkit shards that
    ``--force`` will remove once the new shards are in place."""
    if out.is_symlink() and not out.exists():
        raise LeptonError(f"--out '{out}' is a broken symbolic link")
    if out.exists() and not out.is_dir():
        raise LeptonError(
            f"--out '{out}' is a file: with --shards, --out names a directory (new or empty) "
            "for the shard files"
        )
    for s in srcs:
        if s.is_dir() and same_path(out, s):
            raise LeptonError(f"--out '{out}' is the input directory '{s}': choose another one")
    if not out.exists():
        ancestor = out.absolute()
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise LeptonError(f"cannot create directory '{out}': '{ancestor}' is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise LeptonError(f"cannot create directory '{out}': '{ancestor}' is not writable")
        return []
    if not os.access(out, os.W_OK | os.X_OK):
        raise LeptonError(f"output directory '{out}' is not writable")
    try:
        entries = sorted(out.iterdir())
    except OSError as exc:
        raise LeptonError(f"cannot list output directory '{out}': {exc.strerror}") from None
    if entries and not force:
        raise LeptonError(
            f"output directory '{out}' is not empty (it holds {_names(entries)}); choose a new or "
            "empty directory, or pass --force to replace the shard files in it"
        )
    ours = {shard_name(i) for i in range(n_shards)}
    stale: list[Path] = []
    foreign: list[Path] = []
    for entry in entries:
        if entry.name in ours:
            if entry.is_dir():
                raise LeptonError(f"shard '{entry}' is a directory")
            for f in files:  # even with --force
                check_not_input(entry, {"data": f}, "shard")
        elif fnmatchcase(entry.name, SHARD_GLOB):
            (stale if is_toolkit_shard(entry) else foreign).append(entry)
    if foreign:
        raise LeptonError(
            f"output directory '{out}' holds {_names(foreign)}, which the pattern "
            f"'{out / SHARD_GLOB}' would read as shards but this command does not write "
            "(nor did an earlier lepton convert); move them away or choose another directory"
        )
    return stale


def _plan(src: str | Path | Sequence[str | Path], out: Path, opts: Options, n_shards: int) -> Plan:
    """Rank 0: every check, the row count and the shard boundaries, before anything is written."""
    srcs, files, kind = input_files(src, opts)
    if not 1 <= n_shards <= MAX_SHARDS:
        raise LeptonError(f"--shards {n_shards} must be between 1 and {MAX_SHARDS}")
    stale = _check_out_dir(out, srcs, files, n_shards, opts.force)
    layout = starts = None
    try:
        if kind == "csv":
            source, layout = _csv_open(files[0], opts)
            n, marks = _csv_scan(files[0], opts, layout)
        else:
            source = open_source(srcs, files, kind, opts)
            n = int(source.n_rows or 0)
    except OSError as exc:
        raise DataError(f"reading '{srcs[0]}': {exc}") from None
    if n == 0:
        raise DataError(f"'{source.path}' holds no data rows")
    if n_shards > n:
        raise DataError(
            f"--shards {n_shards}: '{source.path}' has only {n} rows, and every shard needs one"
        )
    bounds = shard_bounds(n, n_shards)
    if kind == "csv":
        starts = []
        for lo in bounds[:-1]:
            offset, lines = marks[lo // CSV_MARK_ROWS]
            starts.append((offset, lines, lo % CSV_MARK_ROWS))
    sizes = np.diff(bounds)
    each = f"{sizes.min()}" if sizes.min() == sizes.max() else f"{sizes.min()}-{sizes.max()}"
    summary = (
        f"wrote {n_shards} shard(s) {out / shard_name(0)} ... {shard_name(n_shards - 1)}: "
        f"{n} rows ({each} a shard) x {describe(source, opts)} from {origin(srcs, files)}; "
        f'read them with data.train = "{out / SHARD_GLOB}"'
    )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeptonError(f"cannot create directory '{out}': {exc.strerror}") from None
    return Plan(srcs, files, kind, out, bounds, created, stale, summary, layout, starts)


# ---- CSV: the counting pass and a shard's rows ---------------------------------------------
def _csv_open(path: Path, opts: Options) -> tuple[Source, _CsvLayout]:
    """``open_csv``'s checks and description, and the layout of the file's first row."""
    source = open_csv(path, opts)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        first = next(r for r in csv.reader(fh, delimiter=opts.delimiter) if r)
    header = not all(_is_number(c) for c in first)
    names = [c.strip() for c in first] if header else None
    t = None if opts.no_target else _target_index(opts.target_column, names, len(first), "")
    return source, _CsvLayout(header, len(first), t, names)


def _text(path: Path, offset: int | None) -> tuple[io.TextIOWrapper, int]:
    """``path`` as UTF-8 text without newline translation (as the csv module wants), from byte
    ``offset`` (None: the start, past a byte-order mark); returns the text and its offset."""
    raw = path.open("rb")
    if offset is None:
        offset = 3 if raw.read(3) == b"\xef\xbb\xbf" else 0
    raw.seek(offset)
    return io.TextIOWrapper(raw, encoding="utf-8", newline=""), offset


def _counted(text: io.TextIOWrapper, pos: list[int]) -> Iterator[str]:
    """The lines of ``text``, adding each one's length in bytes to ``pos[0]`` as it is read
    (``csv.reader`` asks for a line only when its row needs one, so after a row ``pos[0]`` is
    the byte offset where the next row starts)."""
    for line in text:
        pos[0] += len(line.encode("utf-8"))
        yield line


def _cells_error(path: Path, row: int, line: int, got: int, layout: _CsvLayout) -> DataError:
    return DataError(
        f"'{path}' row {row} (line {line}) has {got} cells, but the "
        f"{'header' if layout.header else 'first row'} has {layout.n_cols}"
    )


def _csv_scan(path: Path, opts: Options, layout: _CsvLayout) -> tuple[int, list[tuple[int, int]]]:
    """Rank 0's pass over the file: (data rows, [(byte offset, lines before) where row
    ``k * CSV_MARK_ROWS`` starts]). Rows are split into cells, not parsed."""
    text, start = _text(path, None)
    pos = [start]
    marks: list[tuple[int, int]] = []
    n = 0
    with text:
        reader = csv.reader(_counted(text, pos), delimiter=opts.delimiter)
        before = (start, 0)
        skip_header = layout.header
        try:
            for cells in reader:
                if cells and skip_header:
                    skip_header = False
                elif cells:
                    if n % CSV_MARK_ROWS == 0:
                        marks.append(before)
                    if len(cells) != layout.n_cols:
                        raise _cells_error(path, n, reader.line_num, len(cells), layout)
                    n += 1
                before = (pos[0], reader.line_num)
        except csv.Error as exc:
            raise DataError(f"'{path}' line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"'{path}' is not text in UTF-8 ({exc})") from None
    return n, marks


def _csv_source(
    path: Path,
    opts: Options,
    layout: _CsvLayout,
    described: Source,
    start: tuple[int, int, int],
    lo: int,
    hi: int,
) -> Source:
    """Rows ``[lo, hi)`` of a CSV file, read from the byte offset rank 0 noted before them."""
    offset, lines_before, skip = start
    t, names = layout.target, layout.names

    def column(j: int) -> str:
        return f"column '{names[j]}'" if names else f"column {j}"

    def parse(rows: list[list[str]], lines: list[int], first_row: int):
        table = parse_cells(rows, lines, first_row, layout.n_cols, opts, path, column)
        return split_table(table, t)

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        text, _ = _text(path, offset)
        with text:
            reader = csv.reader(text, delimiter=opts.delimiter)
            rows: list[list[str]] = []
            lines: list[int] = []
            first_row, to_skip, left = lo, skip, hi - lo
            try:
                for cells in reader:
                    if not cells:
                        continue
                    if to_skip:
                        to_skip -= 1
                        continue
                    line = lines_before + reader.line_num
                    if len(cells) != layout.n_cols:
                        raise _cells_error(path, first_row + len(rows), line, len(cells), layout)
                    rows.append(cells)
                    lines.append(line)
                    left -= 1
                    if len(rows) == chunk_rows or left == 0:
                        yield parse(rows, lines, first_row)
                        first_row += len(rows)
                        rows, lines = [], []
                    if left == 0:
                        return
            except csv.Error as exc:
                raise DataError(f"'{path}' line {lines_before + reader.line_num}: {exc}") from None
            except UnicodeDecodeError as exc:
                raise DataError(f"'{path}' is not text in UTF-8 ({exc})") from None
            raise DataError(f"'{path}' changed while it was converted")

    return dataclasses.replace(described, chunks=chunks, n_rows=hi - lo)


# ---- writing ---------------------------------------------------------------------------------
def _shard_source(plan: Plan, opts: Options, lo: int, hi: int, index: int) -> Source:
    if plan.kind == "csv":
        assert plan.csv is not None
        assert plan.csv_starts is not None
        described, _ = _csv_open(plan.files[0], opts)
        start = plan.csv_starts[index]
        source = _csv_source(plan.files[0], opts, plan.csv, described, start, lo, hi)
    else:
        source = open_source(plan.srcs, plan.files, plan.kind, opts, rows=(lo, hi))
    return dataclasses.replace(source, n_rows=hi - lo, contiguous=True)


def _write_mine(
    plan: Plan, opts: Options, comm: Communicator, log: Log, temps: list[tuple[Path, Path]]
) -> None:
    """Write this rank's shards under temporary names (listed in ``temps`` as they are begun)."""
    first, stop = _block(plan.n_shards, comm.rank, comm.size)
    n = plan.bounds[-1]
    for i in range(first, stop):
        lo, hi = plan.bounds[i], plan.bounds[i + 1]
        final = plan.out / shard_name(i)
        tmp = temp_path(final)
        temps.append((tmp, final))
        attrs = {"shard_index": i, "shard_count": plan.n_shards, "first_row": lo, "total_rows": n}
        try:
            source = _shard_source(plan, opts, lo, hi, i)
            write_table(source, tmp, opts, log, attrs)
        except OSError as exc:  # a full disk, an unreadable input: the user's to fix
            if exc.errno in REFUSED:
                raise WriteError(f"cannot write '{final}': {os.strerror(exc.errno)}") from None
            raise DataError(f"converting '{plan.srcs[0]}' to '{final}': {exc}") from None


def _commit_mine(temps: list[tuple[Path, Path]]) -> None:
    for tmp, final in temps:
        try:
            commit(tmp, final)
        except OSError as exc:
            raise WriteError(f"cannot write '{final}': {exc.strerror or exc}") from None


def _collective(comm: Communicator, fn: Callable[[], T]) -> T:
    """``agree`` on ``fn``, with an unexpected error (a bug) turned into an error every rank
    sees (its traceback printed by the rank that hit it), so every rank cleans up its
    temporaries instead of being aborted while others wait."""

    def guarded() -> T:
        try:
            return fn()
        except LeptonError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported here, then agreed as a failure
            traceback.print_exc(file=sys.stderr)
            err = LeptonError(f"rank {comm.rank}: unexpected {type(exc).__name__}: {exc}")
            err.exit_code = EXIT_FAILED
            raise err from None

    return agree(comm, guarded)


def convert_shards(
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    opts: Options,
    n_shards: int,
    comm: Communicator,
    log: Log,
) -> str | None:
    """Convert ``src`` into ``n_shards`` files in the directory ``out``, every rank writing its
    group of shards; returns the summary line on rank 0 (None elsewhere)."""
    out = Path(out)
    plan: Plan = comm.bcast(
        _collective(comm, lambda: _plan(src, out, opts, n_shards) if comm.is_root else None)
    )
    temps: list[tuple[Path, Path]] = []
    try:
        _collective(comm, lambda: _write_mine(plan, opts, comm, log, temps))
        _collective(comm, lambda: _commit_mine(temps))
    except BaseException as exc:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, CollectiveError):  # every rank is here: wait until all cleaned up
            comm.barrier()
        if comm.is_root and plan.created:
            with contextlib.suppress(OSError):  # only when empty: a committed shard stays
                plan.out.rmdir()
        raise
    if not comm.is_root:
        return None
    removed = []
    for path in plan.stale:
        if is_toolkit_shard(path):  # checked again: never a file that changed in the meantime
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        fsync_dir(plan.out)
        log.info(f"removed {len(removed)} shard(s) of an earlier conversion: {_names(removed)}")
    return plan.summary

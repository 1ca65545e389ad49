"""Bring your own data: CSV, NPY and NPZ into chunked HDF5, streamed so files larger than memory
convert.

Rows travel ``chunk_rows`` at a time: CSV through the ``csv`` module, NPY through a read-only
memory map, NPZ members through their (possibly compressed) zip stream. Each chunk is appended to
resizable chunked data sets (features ``X``: float32 when the source is float32, else float64;
target ``y``: float64) in a temporary file that is renamed into place only when the whole input
converted, so a bad cell at row 10 million leaves nothing under the output name. Every error
names the file, and the row and column when a cell is at fault.

The formats are serial, so rank 0 converts while the other ranks wait for its verdict.
"""

from __future__ import annotations

import csv
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError, LeptonError
from ..log import Log
from ..safety import atomic_file, check_not_input
from .h5 import check_writable

FORMATS = (".csv", ".npy", ".npz")
DEFAULT_CHUNK_ROWS = 65_536  # as lepton_hpc.convert_cmd
CHUNK_BYTES = 1 << 20  # an HDF5 chunk holds at most about 1 MiB of features (or chunk_rows rows)
PROGRESS_EVERY_S = 10.0
MISSING = ("error", "nan")


@dataclass(slots=True)
class Options:
    """What ``lepton convert`` was asked for (see ``register_convert``)."""

    x: str = "X"
    y: str = "y"
    target_column: str | None = None  # CSV/NPY: name or index (default: the last column)
    no_target: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    dtype: str | None = None  # features: "float32" | "float64" | None (as the source)
    delimiter: str = ","
    missing: str = "error"  # empty CSV cells: "error" or "nan"
    force: bool = False


@dataclass(slots=True)
class Source:
    """An opened input: its shape, and a generator of (X, y) row chunks in file order."""

    path: Path
    kind: str
    n_features: int
    x_dtype: np.dtype
    y_shape: tuple[int, ...] | None  # () for one target per row, (k,) for k targets, None: no y
    chunks: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray | None]]]
    columns: list[str] = field(default_factory=list)  # feature names, when the source has them
    target: str = ""
    n_rows: int | None = None  # when known before reading (NPY, NPZ)


# ---- conversion ----------------------------------------------------------------------------
def convert_file(src: str | Path, out: str | Path, opts: Options, log: Log | None = None) -> str:
    """Convert ``src`` into the HDF5 file ``out``; returns a one-line summary."""
    src, out = Path(src), Path(out)
    check_options(opts)
    if not src.is_file():
        raise DataError(f"input file '{src}' does not exist")
    kind = src.suffix.lower()
    if kind not in FORMATS:
        raise DataError(f"'{src}': unknown format '{src.suffix}' (expected .csv, .npy or .npz)")
    check_not_input(out, {"data": src}, "--out")  # even with --force
    check_writable(out, force=opts.force)
    opener = {".csv": open_csv, ".npy": open_npy, ".npz": open_npz}[kind]
    try:
        source = opener(src, opts)
        rows = write_h5(source, out, opts, log)
    except OSError as exc:  # unreadable input, a full disk: the user's to fix, not a bug
        raise DataError(f"converting '{src}' to '{out}': {exc}") from None
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    target = f", target '{opts.y}' from {source.target}" if source.y_shape is not None else ""
    return (
        f"wrote {out}: {rows} rows x {source.n_features} features ('{opts.x}', {x_dtype}"
        f"{target}) from {src}"
    )


def check_options(opts: Options) -> None:
    if opts.chunk_rows < 1:
        raise LeptonError(f"--chunk-rows {opts.chunk_rows} must be >= 1")
    if not opts.x or not opts.y or opts.x == opts.y:
        raise LeptonError(f"--x '{opts.x}' and --y '{opts.y}' must be two different names")
    if len(opts.delimiter) != 1:
        raise LeptonError(f"--delimiter {opts.delimiter!r} must be one character")
    if opts.no_target and opts.target_column is not None:
        raise LeptonError("--no-target and --target-column exclude each other")


# ---- writing -------------------------------------------------------------------------------
def write_h5(source: Source, out: Path, opts: Options, log: Log | None) -> int:
    """Append every chunk of ``source`` to a temporary file, then rename it to ``out``."""
    x_dtype = np.dtype(opts.dtype) if opts.dtype else source.x_dtype
    d = source.n_features
    rows_per_chunk = max(1, min(opts.chunk_rows, CHUNK_BYTES // max(1, d * x_dtype.itemsize)))
    if source.n_rows:  # no chunk larger than the whole data set
        rows_per_chunk = min(rows_per_chunk, source.n_rows)
    n = 0
    t_report = time.monotonic() + PROGRESS_EVERY_S
    # the temporary is removed on any error; fsynced and renamed into place on success
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as fh:
        dx = fh.create_dataset(
            opts.x, (0, d), maxshape=(None, d), chunks=(rows_per_chunk, d), dtype=x_dtype
        )
        dy = None
        if source.y_shape is not None:
            ys = source.y_shape
            dy = fh.create_dataset(
                opts.y,
                (0, *ys),
                maxshape=(None, *ys),
                chunks=(rows_per_chunk, *ys),
                dtype=np.float64,
            )
        for X, y in source.chunks(opts.chunk_rows):
            m = X.shape[0]
            dx.resize(n + m, axis=0)
            dx[n : n + m] = X
            if dy is not None:
                dy.resize(n + m, axis=0)
                dy[n : n + m] = y
            n += m
            if log is not None and time.monotonic() > t_report:
                t_report += PROGRESS_EVERY_S
                log.info(f"  {source.path}: {n:,} rows converted")
        if n == 0:
            raise DataError(f"'{source.path}' holds no data rows")
        fh.attrs.update(
            {
                "source": str(source.path),
                "format": source.kind,
                "converter": "lepton convert",
                "columns": np.array(source.columns, dtype=h5py.string_dtype()),
                "target": source.target,
            }
        )
    return n


# ---- CSV -----------------------------------------------------------------------------------
def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _target_index(spec: str | None, names: list[str] | None, n_cols: int, where: str) -> int:
    """The 0-based column of the target: a header name, or an index (negative from the end)."""
    if spec is None:
        return n_cols - 1
    if names is not None and spec in names:
        return names.index(spec)
    try:
        index = int(spec)
    except ValueError:
        has = f"its columns are {', '.join(map(repr, names))}" if names else "it has no header"
        raise DataError(f"{where}: no column '{spec}' for --target-column ({has})") from None
    if not -n_cols <= index < n_cols:
        raise DataError(f"{where}: --target-column {index} is outside its {n_cols} columns")
    return index % n_cols


def open_csv(path: Path, opts: Options) -> Source:
    """A CSV table: a header row when its first row is not all numbers; the target one column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = next((r for r in csv.reader(fh, delimiter=opts.delimiter) if r), None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"'{path}' is not a readable CSV file ({exc})") from None
    if first is None:
        raise DataError(f"'{path}' is empty")
    header = not all(_is_number(c) for c in first)
    names = [c.strip() for c in first] if header else None
    n_cols = len(first)
    t = None if opts.no_target else _target_index(opts.target_column, names, n_cols, f"'{path}'")
    labels = names or [f"{j}" for j in range(n_cols)]
    if t is not None and n_cols < 2:
        raise DataError(f"'{path}' has {n_cols} column(s): no feature column besides the target")
    feature_cols = [j for j in range(n_cols) if j != t]

    def column(j: int) -> str:
        return f"column '{names[j]}'" if names else f"column {j}"

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=opts.delimiter)
            rows: list[list[str]] = []
            lines: list[int] = []
            first_row = 0  # data row index of rows[0]
            skip_header = header
            try:
                for cells in reader:
                    if not cells:  # blank line
                        continue
                    if skip_header:
                        skip_header = False
                        continue
                    if len(cells) != n_cols:
                        raise DataError(
                            f"'{path}' row {first_row + len(rows)} (line {reader.line_num}) has "
                            f"{len(cells)} cells, but the {'header' if header else 'first row'} "
                            f"has {n_cols}"
                        )
                    rows.append(cells)
                    lines.append(reader.line_num)
                    if len(rows) == chunk_rows:
                        yield parse(rows, lines, first_row)
                        first_row += len(rows)
                        rows, lines = [], []
            except csv.Error as exc:
                raise DataError(f"'{path}' line {reader.line_num}: {exc}") from None
            except UnicodeDecodeError as exc:
                raise DataError(f"'{path}' is not text in UTF-8 ({exc})") from None
            if rows:
                yield parse(rows, lines, first_row)

    def parse(
        rows: list[list[str]], lines: list[int], first_row: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        cells = [c for r in rows for c in r]
        if opts.missing == "nan":
            cells = [c if c.strip() else "nan" for c in cells]
        try:
            values = np.fromiter(map(float, cells), dtype=np.float64, count=len(cells))
        except ValueError:
            for i, r in enumerate(rows):  # slow path, only to name the bad cell
                for j, c in enumerate(r):
                    if not (_is_number(c) or (opts.missing == "nan" and not c.strip())):
                        what = f"{c!r} is not a number"
                        if not c.strip():
                            what = "the cell is empty (--missing nan reads empty cells as NaN)"
                        raise DataError(
                            f"'{path}' row {first_row + i} (line {lines[i]}), {column(j)}: {what}"
                        ) from None
            raise
        table = values.reshape(len(rows), n_cols)
        y = None if t is None else table[:, t].copy()
        X = table if t is None else table[:, feature_cols]
        return X, y

    return Source(
        path,
        "csv",
        len(feature_cols),
        np.dtype(np.float64),
        None if t is None else (),
        chunks,
        [labels[j] for j in feature_cols],
        "" if t is None else f"column '{labels[t]}'" if names else f"column {t}",
    )


# ---- NPY and NPZ ---------------------------------------------------------------------------
def _feature_dtype(dtype: np.dtype, where: str) -> np.dtype:
    """float32 stays float32; other real numbers become float64; anything else is an error."""
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise DataError(f"{where}: dtype {dtype} is not a real number type")
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)


def _table_source(
    path: Path, kind: str, array, opts: Options, where: str, read: Callable[[int, int], np.ndarray]
) -> Source:
    """An NPY-like 2-D table (one array); the target is one of its columns unless --no-target."""
    if array.ndim != 2:
        raise DataError(f"{where} must be 2-D (rows x columns), has shape {array.shape}")
    n, n_cols = array.shape
    dtype = _feature_dtype(array.dtype, where)
    t = None if opts.no_target else _target_index(opts.target_column, None, n_cols, where)
    if t is not None and n_cols < 2:
        raise DataError(f"{where} has 1 column: no feature column besides the target")
    keep = [j for j in range(n_cols) if j != t]

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for lo in range(0, n, chunk_rows):
            block = read(lo, min(n, lo + chunk_rows))
            if t is None:
                yield block.astype(dtype, copy=False), None
            else:
                yield block[:, keep].astype(dtype), block[:, t].astype(np.float64)

    target = "" if t is None else f"column {t}"
    y_shape = None if t is None else ()
    return Source(path, kind, len(keep), dtype, y_shape, chunks, [], target, n_rows=n)


def open_npy(path: Path, opts: Options) -> Source:
    """An NPY file, read through a read-only memory map (never loaded whole)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"'{path}' is not a readable NPY file ({exc})") from None
    return _table_source(path, "npy", array, opts, f"'{path}'", lambda lo, hi: array[lo:hi])


@dataclass(slots=True)
class _Member:
    """An NPZ member's header and a reader of its rows ``[lo, hi)``, called in ascending order."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]
    close: Callable[[], None]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _read_header(fh, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        # Version 3 differs from 2 only in allowing UTF-8 field names, which we reject anyway.
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where} is not an NPY array ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: dtype {dtype} holds Python objects, not numbers")
    return tuple(shape), bool(fortran), dtype


def _open_member(path: Path, zf: zipfile.ZipFile, name: str) -> _Member:
    """A member read as a stream of rows (any compression), or memory-mapped when stored."""
    info = zf.getinfo(name)
    where = f"'{path}' member '{name.removesuffix('.npy')}'"
    if info.compress_type == zipfile.ZIP_STORED:  # np.savez: map the bytes in place
        with path.open("rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                raise DataError(f"{where}: damaged zip entry")
            skip = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            raw.seek(info.header_offset + 30 + skip)
            shape, fortran, dtype = _read_header(raw, where)
            offset = raw.tell()
        if int(np.prod(shape)) == 0:
            array = np.empty(shape, dtype=dtype)
        else:
            order = "F" if fortran else "C"
            array = np.memmap(path, dtype, "r", offset, shape, order)
        return _Member(shape, dtype, lambda lo, hi: array[lo:hi], lambda: None)
    stream = zf.open(name)  # np.savez_compressed: decompress sequentially, one chunk at a time
    shape, fortran, dtype = _read_header(stream, where)
    if fortran and len(shape) > 1:
        stream.close()
        raise DataError(
            f"{where} is a Fortran-ordered array in a compressed archive, which cannot be "
            "read row by row; save it C-ordered (np.ascontiguousarray) or with np.savez"
        )
    row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def read(lo: int, hi: int) -> np.ndarray:
        nbytes = (hi - lo) * row_items * dtype.itemsize
        buf = stream.read(nbytes)
        if len(buf) != nbytes:
            raise DataError(f"{where} is truncated (rows {lo}..{hi - 1} missing)")
        return np.frombuffer(buf, dtype=dtype).reshape((hi - lo, *shape[1:]))

    return _Member(shape, dtype, read, stream.close)


def open_npz(path: Path, opts: Options) -> Source:
    """An NPZ archive: features from member ``--x``, targets from member ``--y``."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"'{path}' is not a readable NPZ file ({exc})") from None
    members = [n.removesuffix(".npy") for n in zf.namelist()]
    wanted = [opts.x] + ([] if opts.no_target else [opts.y])
    for name in wanted:
        if name not in members:
            zf.close()
            hint = " (or pass --no-target)" if name == opts.y else ""
            raise DataError(
                f"'{path}' has no member '{name}' (has: {', '.join(members) or 'none'}); "
                f"name the members with --x/--y{hint}"
            )
    if opts.target_column is not None:
        zf.close()
        raise DataError(f"'{path}': --target-column is for CSV and NPY; NPZ targets use --y")
    xm = _open_member(path, zf, opts.x + ".npy")
    x_where = f"'{path}' member '{opts.x}'"
    if xm.ndim != 2:
        raise DataError(f"{x_where} must be 2-D (rows x features), has shape {xm.shape}")
    n, d = xm.shape
    dtype = _feature_dtype(xm.dtype, x_where)
    ym = None
    if not opts.no_target:
        ym = _open_member(path, zf, opts.y + ".npy")
        y_where = f"'{path}' member '{opts.y}'"
        _feature_dtype(ym.dtype, y_where)
        if ym.ndim not in (1, 2) or ym.shape[0] != n:
            raise DataError(
                f"{y_where} has shape {ym.shape} but '{opts.x}' has {n} rows; "
                "targets need one row per row of features"
            )

    def chunks(chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        try:
            for lo in range(0, n, chunk_rows):
                hi = min(n, lo + chunk_rows)
                X = xm.read(lo, hi).astype(dtype, copy=False)
                y = None if ym is None else ym.read(lo, hi).astype(np.float64)
                yield X, y
        except (zipfile.BadZipFile, EOFError) as exc:  # a damaged compressed stream
            raise DataError(f"'{path}' is damaged ({exc})") from None
        finally:
            xm.close()
            if ym is not None:
                ym.close()
            zf.close()

    y_shape = None if ym is None else tuple(ym.shape[1:])
    target = "" if ym is None else f"member '{opts.y}'"
    return Source(path, "npz", d, dtype, y_shape, chunks, [], target, n_rows=n)

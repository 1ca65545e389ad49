"""``lepton inspect FILE...``: what an HDF5 (or netCDF-4) file holds, as ``lepton`` will read it.

For each numeric data set, nested groups included: rows, features, dtype, storage layout,
filters, links, and the load class, which says how ``lepton train`` would read it:

- ``direct``: one contiguous, unfiltered run of little-endian float32/float64 bytes in the file
  itself, read with threaded ``pread``s. The verdict is the reader's own test (``reader._direct``
  with the reader's dtype rule), so inspect and the reader never disagree;
- ``chunked`` and ``compressed``: chunks read with ``pread`` and decoded on the rank's threads
  (``data.chunk_read``: gzip, lzf, szip, shuffle, fletcher32, and hdf5plugin's bzip2, bitshuffle
  (alone or with LZ4, or with zstd where libzstd loads), zstd and LZ4 (the system's libzstd
  and liblz4, or ``zstandard`` and ``lz4``), ZFP, SZ, SZ3, SPERR, FCIDecomp, HTJ2K, Blosc and
  Blosc2 when ``blosc`` and ``blosc2`` are installed);
- ``through HDF5``: everything else HDF5 reads for us: virtual data sets, external raw storage,
  data sets behind external links, compact ones, other dtypes (integers, float16, big-endian),
  chunks with filters from other plugins HDF5 finds (on one core),
  and data sets not yet written. A filter this HDF5 cannot decode is named in a note
  with its fix.

It also says which data sets ``lepton train`` picks by default (``data.x`` and ``data.y``, or
``--x``/``--y``) and what the reader says of them: their rows agree, or the one-line error
``lepton train`` would stop with. Nothing is written unless ``--out`` asks for a JSON file
(atomically, never over an input). A missing, damaged or non-HDF5 file is one error line and
exit 2. The command runs alone, without MPI.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comm.base import Communicator
from .data.plugins import PLUGIN_FILTERS
from .errors import DataError, LeptonError
from .log import Log

FILTER_NAMES = {
    1: "gzip",
    2: "shuffle",
    3: "fletcher32",
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    32000: "lzf",
    **PLUGIN_FILTERS,
}
SMALL_CHUNK_BYTES = 16 << 10  # chunks smaller than this make a slow read (one HDF5 call each)
NETCDF_DIMENSION = "This is a netCDF dimension but not a netCDF variable"
# First bytes of files users mistake for HDF5, and what to do with them.
OTHER_FORMATS = (
    (b"CDF\x01", "a netCDF-3 (classic) file, not HDF5: rewrite it as netCDF-4 (nccopy -k nc4)"),
    (
        b"CDF\x02",
        "a netCDF-3 (64-bit offset) file, not HDF5: rewrite it as netCDF-4 (nccopy -k nc4)",
    ),
    (b"CDF\x05", "a netCDF-3 (CDF-5) file, not HDF5: rewrite it as netCDF-4 (nccopy -k nc4)"),
    (b"PAR1", "a Parquet file, not HDF5: convert it with lepton convert"),
    (b"\x93NUMPY", "an NPY file, not HDF5: convert it with lepton convert"),
    (b"PK\x03\x04", "a zip (NPZ?) file, not HDF5: convert an NPZ with lepton convert"),
)


def _defaults() -> tuple[str, str]:
    """``data.x`` and ``data.y`` as ``lepton train`` defaults them."""
    from .config import DataConfig

    cfg = DataConfig()
    return cfg.x, cfg.y


def register_inspect(sub) -> None:
    x, y = _defaults()
    p = sub.add_parser(
        "inspect",
        help="list an HDF5/netCDF-4 file's data sets, their layout and how lepton reads them",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="HDF5 or netCDF-4 files")
    p.add_argument("--x", default=x, help=f"features data set to check (default: data.x, '{x}')")
    p.add_argument("--y", default=y, help=f"targets data set to check (default: data.y, '{y}')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="write the JSON to this file instead (atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run_inspect, needs_mpi=False)


# ---- one data set --------------------------------------------------------------------------
@dataclass(slots=True)
class Entry:
    """One data set as listed (the JSON field names)."""

    path: str
    shape: list[int]
    rows: int | None
    features: int | None
    dtype: str
    layout: str
    chunks: list[int] | None
    filters: list[dict[str, Any]]
    load: str
    why: str  # why the load class is what it is, in a few words
    notes: list[str] = field(default_factory=list)  # what else a user should know
    via: str | None = None  # "external link to FILE:/PATH" or "soft link to /PATH"
    external_storage: list[str] = field(default_factory=list)
    virtual_sources: list[str] = field(default_factory=list)
    dimension_scale: bool = False


def _filters(plist) -> list[dict[str, Any]]:
    out = []
    for i in range(plist.get_nfilters()):
        code, _flags, values, name = plist.get_filter(i)
        label = FILTER_NAMES.get(code) or name.decode(errors="replace") or f"filter {code}"
        item: dict[str, Any] = {"id": int(code), "name": label}
        if code == 1 and values:
            item["level"] = int(values[0])
        elif values:
            item["values"] = [int(v) for v in values]
        out.append(item)
    return out


def _filter_text(filters: list[dict[str, Any]]) -> str:
    parts = [f"{f['name']}({f['level']})" if "level" in f else f["name"] for f in filters]
    return ",".join(parts) or "-"


def _dtype_text(dtype) -> str:
    text = str(dtype.newbyteorder("=")) if dtype.byteorder in "<>" else str(dtype)
    return text + (" big-endian" if dtype.byteorder == ">" else "")


def describe(dset, st: os.stat_result, path: str | None = None, via: str | None = None) -> Entry:
    """``dset`` as listed; ``st``: ``os.stat`` of the file opened (as ``reader.inspect`` has).

    ``path`` and ``via``: where it was found when that was through an external link (its bytes
    are then in another file, and ``dset.name`` is its name there).
    """
    import h5py
    import numpy as np

    from .data import chunk_read, plugins
    from .data.reader import _direct, _feature_dtype

    plist = dset.id.get_create_plist()
    layout_id = plist.get_layout()
    layout = {
        h5py.h5d.COMPACT: "compact",
        h5py.h5d.CONTIGUOUS: "contiguous",
        h5py.h5d.CHUNKED: "chunked",
    }.get(layout_id, "virtual" if dset.is_virtual else f"layout {layout_id}")
    filters = _filters(plist)
    ext = [
        plist.get_external(i)[0].decode(errors="replace") for i in range(plist.get_external_count())
    ]
    if ext:
        layout = "external"
    vsources: list[str] = []
    if dset.is_virtual:
        vsources = sorted({f"{s.file_name}:{s.dset_name}" for s in dset.virtual_sources()})
    shape = [int(s) for s in dset.shape]
    rows = shape[0] if shape else None
    features = None if not shape else (1 if len(shape) == 1 else int(np.prod(shape[1:])))
    want = _feature_dtype(dset.dtype)
    offset = _direct(dset, want, st)  # the reader's own verdict
    if offset is not None:
        load, why = "direct", f"contiguous bytes at offset {offset}, read with pread"
    elif via is not None:
        load, why = "through HDF5", "behind an external link: its bytes are in another file"
    elif dset.is_virtual:
        load, why = "through HDF5", f"virtual: mapped from {len(vsources)} source(s)"
    elif ext:
        load, why = "through HDF5", "raw data in external files"
    elif layout == "chunked":
        load = "compressed" if filters else "chunked"
        why = f"chunks of {list(dset.chunks)}" + (f", {_filter_text(filters)}" if filters else "")
        ids = {f["id"] for f in filters}
        if ids - chunk_read.FILTERS or not chunk_read.private_loaded(ids):  # as ``layout``
            load, why = "through HDF5", why + ": decoded by HDF5, on one core"
    elif layout == "compact":
        load, why = "through HDF5", "compact: stored in the object header"
    elif dset.dtype.newbyteorder("<") != want.newbyteorder("<"):
        load, why = "through HDF5", f"{_dtype_text(dset.dtype)} is read as {want}"
    elif dset.dtype.byteorder == ">":
        load, why = "through HDF5", "big-endian: HDF5 swaps the bytes"
    elif dset.id.get_offset() is None:
        load, why = "through HDF5", "never written: reads as its fill value"
    else:
        load, why = "through HDF5", "its bytes lie beyond the end of the file (truncated?)"
    notes = []
    missing = plugins.missing_filter(plist)
    if missing is not None:  # the reader stops on it with this reason
        load, why = "through HDF5", f"chunks of {list(dset.chunks)}: HDF5 cannot decode them here"
        notes.append(missing)
    if len(shape) not in (1, 2):
        notes.append(f"{len(shape)}-D: lepton reads 1-D or 2-D data sets only")
    if dset.chunks and dset.size:
        chunk_bytes = int(np.prod(dset.chunks)) * dset.dtype.itemsize
        if chunk_bytes < SMALL_CHUNK_BYTES and dset.chunks[0] < shape[0]:
            notes.append(
                f"small chunks ({chunk_bytes} bytes): slow to read; "
                "rewrite it contiguous (h5repack -f NONE -l CONTI) to read it directly"
            )
    prefix = os.environ.get("HDF5_EXTFILE_PREFIX", "")
    notes += [  # HDF5 opens relative names from the current directory (or that prefix)
        f"external file '{name}' not found (HDF5 looks from the current directory)"
        for name in ext
        if not os.path.exists(os.path.join(prefix, name))
    ]
    scale = dset.attrs.get("CLASS", b"") == b"DIMENSION_SCALE"
    if scale:
        notes.append("a dimension scale (coordinate variable)")
    return Entry(
        path or dset.name,
        shape,
        rows,
        features,
        _dtype_text(dset.dtype),
        layout,
        list(dset.chunks) if dset.chunks else None,
        filters,
        load,
        why,
        notes,
        via,
        ext,
        vsources,
        bool(scale),
    )


# ---- one file ------------------------------------------------------------------------------
def _not_hdf5(path: Path) -> str:
    """Why ``path`` cannot be opened as HDF5, naming the format it is when that is known."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"'{path}' cannot be read ({exc.strerror})"
    for magic, what in OTHER_FORMATS:
        if head.startswith(magic):
            return f"'{path}' is {what}"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return f"'{path}' is a damaged HDF5 file (truncated or overwritten)"
    return f"'{path}' is not an HDF5 file"


def _attr_text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def inspect_file(path: str | Path, x: str, y: str | None) -> dict[str, Any]:
    """Everything ``lepton inspect`` says about one file, as JSON-ready values."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise DataError(f"'{p}' does not exist")
    if p.is_dir():
        raise DataError(f"'{p}' is a directory, not an HDF5 file")
    try:
        fh = h5py.File(p, "r")
    except OSError:
        raise DataError(_not_hdf5(p)) from None
    st = os.stat(p)
    entries: list[Entry] = []
    links: list[dict[str, Any]] = []
    other: list[str] = []
    dims: list[str] = []
    seen: set[int] = set()

    def visit(group, prefix: str) -> None:
        for name in group:
            full = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                item = {
                    "path": full,
                    "kind": "external",
                    "file": link.filename,
                    "target": link.path,
                }
                try:
                    obj = group.get(name)
                except (KeyError, OSError, ValueError, RuntimeError) as exc:
                    obj, item["error"] = None, str(exc).splitlines()[0]
                item["ok"] = obj is not None
                links.append(item)
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiub":
                    via = f"external link to {link.filename}:{link.path}"
                    entries.append(describe(obj, st, path=full, via=via))
                continue
            if isinstance(link, h5py.SoftLink):
                obj = group.get(name)
                links.append(
                    {"path": full, "kind": "soft", "target": link.path, "ok": obj is not None}
                )
                continue
            obj = group.get(name)
            key = hash(obj.id)
            if key in seen:  # a second hard link to an object already listed
                continue
            seen.add(key)
            if isinstance(obj, h5py.Group):
                visit(obj, full)
            elif isinstance(obj, h5py.Dataset):
                if _attr_text(obj.attrs.get("NAME", b"")).startswith(NETCDF_DIMENSION):
                    dims.append(full)  # netCDF's placeholder for a dimension: no data
                elif obj.dtype.kind in "fiub":
                    entries.append(describe(obj, st))
                else:
                    other.append(f"{full} ({obj.dtype})")
            else:
                other.append(f"{full} (named type)")

    with fh:
        try:
            visit(fh, "")
            netcdf = fh.attrs.get("_NCProperties")
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise DataError(f"'{p}' is damaged ({str(exc).splitlines()[0]})") from None
    report: dict[str, Any] = {
        "file": str(p),
        "format": "netCDF-4" if netcdf is not None else "HDF5",
        "bytes": st.st_size,
        "datasets": [_entry_json(e) for e in entries],
        "links": links,
    }
    if netcdf is not None:
        report["netcdf"] = _attr_text(netcdf)
        report["netcdf_dimensions"] = dims
    if other:
        report["not_numeric"] = other
    report["defaults"] = _defaults_report(p, x, y)
    return report


def _entry_json(e: Entry) -> dict[str, Any]:
    out = {k: getattr(e, k) for k in Entry.__slots__}
    for k in ("via", "external_storage", "virtual_sources"):
        if not out[k]:
            del out[k]
    return out


def _defaults_report(path: Path, x: str, y: str | None) -> dict[str, Any]:
    """What ``lepton train`` would say of data sets ``x`` and ``y``: the reader's own check."""
    from .data.reader import inspect as reader_inspect

    out: dict[str, Any] = {"x": x, "y": y}
    try:
        info = reader_inspect(str(path), x, y)
    except LeptonError as exc:
        out.update(ok=False, error=str(exc))
        return out

    def load(offset, chunks) -> str:  # the class the reader will load it by
        if offset is not None:
            return "direct"
        if chunks is not None:
            return "compressed" if chunks.filters else "chunked"
        return "through HDF5"

    out.update(
        ok=True,
        rows=info.n_rows,
        features=info.n_features,
        x_direct=info.x_offset is not None,
        y_direct=info.y_offset is not None,
        x_load=load(info.x_offset, info.x_chunks),
        y_load=load(info.y_offset, info.y_chunks),
    )
    return out


# ---- output --------------------------------------------------------------------------------
def _table(report: dict[str, Any]) -> list[str]:
    kind = report["format"]
    if "netcdf" in report:
        kind += f" ({report['netcdf']})"
    lines = [f"{report['file']}: {kind}, {report['bytes']:,} bytes"]
    head = ("data set", "rows", "features", "dtype", "layout", "filters", "load")
    rows = []
    for d in report["datasets"]:
        layout = d["layout"] + (f" {tuple(d['chunks'])}" if d["chunks"] else "")
        rows.append(
            (
                d["path"],
                "-" if d["rows"] is None else f"{d['rows']:,}",
                "-" if d["features"] is None else str(d["features"]),
                d["dtype"],
                layout,
                _filter_text(d["filters"]),
                d["load"]
                + (f": {d['why']}" if d["load"] != "direct" else "")
                + "".join(f" [{n}]" for n in d["notes"]),
            )
        )
    if rows:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        for r in [head, *rows]:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            lines.append("  " + "  ".join(cells) + "  " + r[-1])
    else:
        lines.append("  no numeric data sets")
    for link in report["links"]:
        target = (
            f"{link['file']}:{link['target']}" if link["kind"] == "external" else link["target"]
        )
        state = (
            "" if link["ok"] else f" (dangling{': ' + link['error'] if 'error' in link else ''})"
        )
        lines.append(f"  {link['kind']} link {link['path']} -> {target}{state}")
    if report.get("netcdf_dimensions"):
        lines.append(f"  netCDF dimensions (no data): {', '.join(report['netcdf_dimensions'])}")
    if report.get("not_numeric"):
        lines.append(f"  not numeric (skipped): {', '.join(report['not_numeric'])}")
    dfl = report["defaults"]
    names = f"x = '{dfl['x']}', y = '{dfl['y']}'"
    if dfl["ok"]:
        lines.append(
            f"  lepton train reads {names}: {dfl['rows']:,} rows x {dfl['features']} features, "
            f"rows agree (x {dfl['x_load']}, y {dfl['y_load']})"
        )
    else:
        lines.append(f"  lepton train with {names} would stop: {dfl['error']}")
    return lines


def run_inspect(args: argparse.Namespace, comm: Communicator, log: Log) -> int:  # noqa: ARG001
    """Inspect every file (all are reported, good or bad); one error line when any failed."""
    from .data.h5 import check_writable
    from .safety import check_not_input, write_json

    if args.out:
        for f in args.files:
            check_not_input(args.out, {"data": f}, "--out")
        check_writable(args.out, force=args.force)
    reports, errors = [], []
    for f in args.files:
        try:
            reports.append(inspect_file(f, args.x, args.y))
        except LeptonError as exc:
            errors.append(str(exc))
            reports.append({"file": str(f), "error": str(exc)})
    if args.out:
        try:
            write_json(Path(args.out), {"files": reports})
        except OSError as exc:
            raise LeptonError(f"cannot write --out '{args.out}': {exc.strerror}") from None
    elif args.json:
        print(json.dumps({"files": reports}, indent=2), flush=True)
    else:
        for i, report in enumerate(r for r in reports if "error" not in r):
            if i:
                log.info("")
            for line in _table(report):
                log.info(line)
    if errors:
        raise DataError("; ".join(errors))
    return 0

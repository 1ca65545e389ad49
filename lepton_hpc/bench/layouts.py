"""The load rate of one data set stored contiguous, chunked, and chunked with each compressor the
reader decodes itself, against a raw read of the same bytes.

    mpiexec -n k python -m lepton_hpc.bench.layouts layouts --dir D --rows N --features F \\
        --threads 1,2 --repeats R --out J

Each rank reads its row block of every layout the way ``reader.read_block`` does (contiguous:
``pread_rows`` with the NaN/Inf screen; chunked: ``chunk_read.read_rows`` screening as it
decodes) into a fresh 64-byte aligned buffer, from the page cache (a first round is dropped).
``raw`` is ``pread_rows`` without the screen on the contiguous file: the bytes a loader has to
move anyway. ``h5py`` (one thread, at the first thread count) is the path the chunked files took
before. Rates are GB/s of decoded data; each figure is the median over rounds of the slowest
rank; the cases of a round run in turn, so a burst of load from other processes hits all alike.
CPU / wall above 1 shows a rank's threads decoding at once (no GIL held).

The files are written once by ``make`` (in the runner's process; kept for the next run): values
of limited precision (normal, rounded to 3 decimals) as measurements are, so the compressors find
some redundancy; row chunks of 1 MiB.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from .common import figure, part_parser, write_part

CHUNK_BYTES = 1 << 20
# Targets the reader is held to: chunked against contiguous at the same threads, and a
# compressed layout's decode speed-up from 1 to 2 threads (and from 1 to 2 ranks).
TARGETS = {"chunked_vs_contiguous": 0.8, "decode_scaling": 1.6}


def layouts() -> dict[str, dict]:
    """h5py ``create_dataset`` keywords per layout: the compressors the reader decodes itself
    (hdf5plugin's zstd, LZ4, Blosc, bitshuffle with LZ4 and with zstd, ZFP (reversible) and
    Blosc2 where hdf5plugin and the library or package decoding each are installed)."""
    from ..data import chunk_read

    out: dict[str, dict] = {
        "contiguous": {},
        "chunked": {},
        "gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
        "lzf": {"compression": "lzf", "shuffle": True},
    }
    try:
        import hdf5plugin
    except ImportError:
        return out
    if chunk_read.ZSTD in chunk_read.FILTERS:
        out["zstd"] = {**hdf5plugin.Zstd(clevel=1), "shuffle": True}
    if chunk_read.LZ4 in chunk_read.FILTERS:
        out["lz4"] = {**hdf5plugin.LZ4(), "shuffle": True}
    if chunk_read.BSHUF_LZ4 in chunk_read.BSHUF_CODECS:
        out["bitshuffle"] = dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if chunk_read.BSHUF_ZSTD in chunk_read.BSHUF_CODECS:
        out["bitshuffle_zstd"] = dict(hdf5plugin.Bitshuffle(cname="zstd", clevel=1))
    if chunk_read.ZFP in chunk_read.FILTERS:  # reversible: the bytes must equal the raw read
        out["zfp"] = dict(hdf5plugin.Zfp(reversible=True))
    if chunk_read.BLOSC in chunk_read.FILTERS:
        blosc = hdf5plugin.Blosc
        out["blosc"] = dict(blosc(cname="lz4", clevel=5, shuffle=blosc.SHUFFLE))
    if chunk_read.BLOSC2 in chunk_read.FILTERS:
        blosc2 = hdf5plugin.Blosc2
        out["blosc2"] = dict(blosc2(cname="lz4", clevel=5, filters=blosc2.SHUFFLE))
    return out


COMPRESSED = (
    *("gzip", "lzf", "zstd", "lz4", "blosc", "bitshuffle", "bitshuffle_zstd", "zfp", "blosc2"),
)


def make(root: Path, rows: int, features: int) -> dict[str, Path]:
    """The layout files of ``rows`` x ``features`` float32 in ``root``, written where missing
    (each under a temporary name, renamed when complete)."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    chunk_rows = max(1, CHUNK_BYTES // (features * 4))
    paths = {}
    block = None
    for name, kw in layouts().items():
        path = root / f"{name}-{rows}x{features}.h5"
        paths[name] = path
        if path.exists():
            continue
        if block is None:
            rng = np.random.default_rng(0)
            block = np.round(rng.normal(size=(rows, features)), 3).astype(np.float32)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as fh:
            chunks = None if name == "contiguous" else (min(rows, chunk_rows), features)
            fh.create_dataset("X", data=block, chunks=chunks, **kw)
        os.replace(tmp, path)
    return paths


def measure(paths: dict[str, Path], comm, threads_list: list[int], repeats: int) -> dict:
    """Each rank's read of its block of every layout, at each thread count (see the module)."""
    import h5py

    from ..data import chunk_read
    from ..data.direct_read import pread_rows
    from ..data.reader import aligned_empty, row_block

    with h5py.File(paths["contiguous"], "r") as fh:
        rows, features = fh["X"].shape
        offset = fh["X"].id.get_offset()
    lays = {}
    for name, path in paths.items():
        if name != "contiguous":
            with h5py.File(path, "r") as fh:
                lays[name] = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
    start, stop = row_block(rows, comm.rank, comm.size)
    m = stop - start

    def case(name: str, how: str, threads: int):
        path = str(paths[name])

        def fn() -> np.ndarray:
            out = aligned_empty((m, features), np.float32)
            if how == "raw":
                pread_rows(path, offset, start, out, threads)
            elif how == "h5py":
                with h5py.File(path, "r") as fh:
                    fh["X"].read_direct(out, np.s_[start:stop], np.s_[:])
            elif name == "contiguous":
                pread_rows(path, offset, start, out, threads, screen=True)
            else:
                flags = np.zeros(m, dtype=bool)
                chunk_read.read_rows(path, "X", lay, start, stop, out, threads, None, flags)
            return out

        lay = lays.get(name)
        return fn

    total = rows * features * 4
    cases: dict[str, tuple] = {}
    for i, t in enumerate(threads_list):
        cases[f"raw_t{t}"] = (case("contiguous", "raw", t), "raw", t)
        for name in paths:
            if name != "contiguous" and lays[name] is None:
                continue  # not read directly here: nothing of ours to measure
            cases[f"{name}_t{t}"] = (case(name, "lepton", t), name, t)
        if i == 0:
            for name in paths:
                if name != "contiguous":
                    cases[f"{name}_h5py"] = (case(name, "h5py", 1), f"{name} (h5py)", 1)
    wall: dict[str, list[float]] = {k: [] for k in cases}
    busy: dict[str, list[float]] = {k: [] for k in cases}
    differ: list[str] = []
    for rep in range(repeats + 1):  # the first round fills the page cache and is dropped
        want = None
        for key, (fn, _label, _t) in cases.items():
            comm.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            got = fn()
            c1 = time.process_time()
            comm.barrier()
            w = time.perf_counter() - t0
            if rep:
                wall[key].append(w)
                busy[key].append((c1 - c0) / w)
            elif want is None:  # the raw read: every layout must give its bytes
                want = got
            elif not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                differ.append(key)
    differ = sorted({k for ks in comm.allgather(differ) for k in ks})
    figures: dict = {}
    table = []
    for key, (_fn, label, t) in cases.items():
        s = float(max(comm.allgather(statistics.median(wall[key]))))
        cpu = float(statistics.fmean(comm.allgather(statistics.median(busy[key]))))
        figures[f"{key}_s"] = figure(s, "s", note="median over rounds, slowest rank")
        figures[f"{key}_GBps"] = figure(total / s / 1e9, "GB/s", note="decoded bytes of X")
        figures[f"{key}_cpu_per_wall"] = figure(cpu, "cores", note="mean over ranks")
        table.append({"case": key, "layout": label, "threads": t})
    for t in threads_list:
        raw = figures[f"raw_t{t}_s"]["value"]
        for row in table:
            if row["threads"] == t and f"{row['case']}_s" in figures:
                figures[f"{row['case']}_vs_raw"] = figure(
                    raw / figures[f"{row['case']}_s"]["value"], "ratio", note="raw time / time"
                )
    sizes = {name: p.stat().st_size for name, p in paths.items()}
    return {
        "ranks": comm.size,
        "rows": int(rows),
        "features": int(features),
        "bytes": total,
        "threads": threads_list,
        "file_bytes": sizes,
        "direct": {name: lays.get(name) is not None for name in paths if name != "contiguous"},
        "cases": table,
        "page_cache": "warm: a first round of every case is dropped",
        "same_bytes_as_raw": not differ,
        "differ": differ,
        "timings": {k: [round(s, 7) for s in v] for k, v in wall.items()},
        "figures": figures,
    }


def scaling_ratios(parts: dict) -> list[dict]:
    """The layouts' ratios with their targets from the parts ``layouts_k1`` and ``layouts_k2``:
    chunked against contiguous, and each compressed layout's speed-up from 1 to 2 threads (one
    rank) and from 1 to 2 ranks (one thread each)."""

    def fig(part: str, key: str) -> float | None:
        entry = parts.get(part, {})
        if entry.get("status") != "ok":
            return None
        f = entry["results"]["figures"].get(key)
        return None if f is None else f["value"]

    out = []
    for t in (1, 2):
        c, k = fig("layouts_k1", f"contiguous_t{t}_s"), fig("layouts_k1", f"chunked_t{t}_s")
        if c and k:
            out.append(
                {
                    "name": f"chunked / contiguous rate, 1 rank x {t} thread(s)",
                    "value": c / k,
                    "target": TARGETS["chunked_vs_contiguous"],
                }
            )
    direct = parts.get("layouts_k1", {}).get("results", {}).get("direct", {})
    for name in COMPRESSED:
        if not direct.get(name):
            continue
        one, two = fig("layouts_k1", f"{name}_t1_s"), fig("layouts_k1", f"{name}_t2_s")
        if one and two:
            out.append(
                {
                    "name": f"{name} decode, 2 threads / 1 thread (1 rank)",
                    "value": one / two,
                    "target": TARGETS["decode_scaling"],
                }
            )
        ranks2 = fig("layouts_k2", f"{name}_t1_s")
        if one and ranks2:
            out.append(
                {
                    "name": f"{name} decode, 2 ranks / 1 rank (1 thread each)",
                    "value": one / ranks2,
                    "target": TARGETS["decode_scaling"],
                }
            )
    return out


def main() -> None:
    from ..comm import world

    parser = part_parser(__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    paths = {name: Path(args.dir) / f"{name}-{args.rows}x{args.features}.h5" for name in layouts()}
    threads = [int(t) for t in args.threads.split(",")]
    comm = world()
    result = measure(paths, comm, threads, args.repeats)
    if comm.is_root:
        write_part(args.out, result)


if __name__ == "__main__":
    main()

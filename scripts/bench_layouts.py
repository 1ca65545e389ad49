"""Load rate of one data set stored contiguous, chunked, and chunked with shuffle + gzip level 1.

Run by hand (not a test): ``python scripts/bench_layouts.py [--rows 4000000] [--cols 32]
[--dir TMPDIR/lepton_layouts] [--repeats 3] [--threads 1 2]``. Each layout is read whole, the
way ``reader.read_block`` reads a rank's block (contiguous: ``pread_rows`` with the NaN/Inf
screen; chunked: ``chunk_read.read_rows`` then the screen), from the page cache (every file is
read once first), into a fresh 64-byte aligned buffer. A raw read of the same byte count
(``pread_rows`` without the screen, on the contiguous file) is measured in the same run, as is
h5py's read of the chunked files (the path those took before). Rates are GB/s of decompressed
data; each line is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numba
import numpy as np

from lepton_hpc.data import chunk_read
from lepton_hpc.data.direct_read import nonfinite_rows, pread_rows
from lepton_hpc.data.reader import _feature_dtype, aligned_empty


def make(root: Path, rows: int, cols: int) -> dict[str, Path]:
    """The three files (written once; kept for the next run)."""
    root.mkdir(parents=True, exist_ok=True)
    chunk_rows = max(1, (1 << 20) // (cols * 4))  # row chunks of 1 MiB
    specs = {
        "contiguous": {},
        "chunked": {"chunks": (chunk_rows, cols)},
        "shuffle+gzip1": {
            "chunks": (chunk_rows, cols),
            "compression": "gzip",
            "compression_opts": 1,
            "shuffle": True,
        },
    }
    paths = {}
    for name, kw in specs.items():
        path = root / f"{name}-{rows}x{cols}.h5"
        if not path.exists():
            rng = np.random.default_rng(0)
            tmp = path.with_suffix(".tmp")
            with h5py.File(tmp, "w") as fh:
                ds = fh.create_dataset("X", shape=(rows, cols), dtype=np.float32, **kw)
                step = 1 << 18
                for a in range(0, rows, step):
                    b = min(rows, a + step)
                    # measurements of limited precision, as files hold: gzip finds some redundancy
                    block = rng.normal(size=(b - a, cols)).astype(np.float32)
                    ds[a:b] = np.round(block, 3)
            os.replace(tmp, path)
        paths[name] = path
    return paths


def read(path: Path, how: str, threads: int) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) to read the whole data set ``X`` of ``path``
    with ``how``: CPU / wall above 1 shows threads running at once (without the GIL)."""
    with h5py.File(path, "r") as fh:
        ds = fh["X"]
        shape, dtype = ds.shape, _feature_dtype(ds.dtype)
        offset = ds.id.get_offset()
        lay = chunk_read.layout(ds, dtype, os.stat(path))
    t, cpu = time.perf_counter(), time.process_time()
    out = aligned_empty(shape, dtype)
    if how == "raw":
        pread_rows(str(path), offset, 0, out, threads)
    elif how == "lepton" and offset is not None:
        pread_rows(str(path), offset, 0, out, threads, screen=True)
    elif how == "lepton":
        chunk_read.read_rows(str(path), "X", lay, 0, shape[0], out, threads)
        nonfinite_rows(out)
    else:  # h5py, one thread
        with h5py.File(path, "r") as fh:
            fh["X"].read_direct(out)
        nonfinite_rows(out)
    return time.perf_counter() - t, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--cols", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lepton_layouts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    paths = make(args.dir, args.rows, args.cols)
    gb = args.rows * args.cols * 4 / 1e9
    for name, path in paths.items():
        size = path.stat().st_size
        print(f"{name:14s} {size / 1e6:8.1f} MB on disk ({gb * 1e9 / size:.2f}x)")
        read(path, "lepton", 2)  # into the page cache, kernels compiled
    print(f"{gb:.3f} GB per read; median of {args.repeats}; load {os.getloadavg()[0]:.1f}")
    for threads in args.threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        cases = [("raw", "contiguous", "raw")]
        cases += [(name, name, "lepton") for name in paths]
        cases += [(f"{name} (h5py)", name, "h5py") for name in paths if name != "contiguous"]
        times: dict[str, list[float]] = {c[0]: [] for c in cases}
        busy: dict[str, list[float]] = {c[0]: [] for c in cases}
        for _ in range(args.repeats):  # interleaved, so a burst of load hits every case alike
            for label, name, how in cases:
                wall, cpu = read(paths[name], how, threads)
                times[label].append(wall)
                busy[label].append(cpu / wall)
        raw = statistics.median(times["raw"])
        for label, _, _ in cases:
            s = statistics.median(times[label])
            print(
                f"threads={threads} {label:22s} {gb / s:6.2f} GB/s  {raw / s:5.2f} of raw  "
                f"cpu/wall {statistics.median(busy[label]):4.2f}"
            )
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

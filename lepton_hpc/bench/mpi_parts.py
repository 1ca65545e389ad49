"""The parts that run under ``mpiexec -n k``: our allreduce by buffer size, the HDF5 read rate
of our partitioned reader against a raw read of the same bytes, the steady full-batch step, the
mini-batch step taken apart, and the streamed read (``data.stream``) from a cold file against a
sequential read of it.

    mpiexec -n 2 python -m lepton_hpc.bench.mpi_parts allreduce --features D --out J
    mpiexec -n k python -m lepton_hpc.bench.mpi_parts hdf5 --h5 F --x-bin X --y-bin Y --rows N ...
    mpiexec -n k python -m lepton_hpc.bench.mpi_parts step --h5 F [--weak-h5 W] [--backend B] ...
    mpiexec -n k python -m lepton_hpc.bench.mpi_parts minibatch --h5 F --out J

Collectives go through ``lepton_hpc.comm`` (``allreduce_`` is mpi4py's in-place
``Allreduce``), as in training. Rank 0 writes the part's JSON.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import numpy as np
from numba import njit, prange

from ..comm import Communicator, world
from .common import (
    GLOBAL_BATCH,
    bench_params,
    buffer_sizes,
    evict,
    figure,
    part_parser,
    repeats_for,
    write_part,
)


def _median_max(comm: Communicator, samples: list[float]) -> float:
    """The slowest rank decides a collective step: max over ranks of each rank's median."""
    return float(max(comm.allgather(statistics.median(samples))))


def allreduce(args, comm: Communicator) -> dict:
    """Median seconds of one in-place float64 sum per buffer size (8 B .. 8 MiB, and ours)."""
    rows = []
    train_bytes = 8 * (args.features + 5)  # [gradient (d + 1), loss, rows, stop flag, step]
    for nbytes in sorted({*buffer_sizes(args.sizes), train_bytes}):
        buf = np.ones(max(1, nbytes // 8))
        reps = repeats_for(nbytes, args.repeats)
        for _ in range(10):
            comm.allreduce_(buf)
        comm.barrier()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            comm.allreduce_(buf)
            samples.append(time.perf_counter() - t0)
        rows.append({"bytes": nbytes, "median_s": _median_max(comm, samples), "repeats": reps})
    return {"ranks": comm.size, "allreduce": rows, "train_buffer_bytes": train_bytes}


def hdf5(args, comm: Communicator) -> dict:
    """Our reader (``read_block``: X and y, NaN/Inf screen) against raw reads of the same rows'
    bytes from flat files, each rank its block, all warm in the page cache. The raw reads use
    the same number of threads per rank as our reader (``pread_rows`` without the screen), into
    a preallocated, already touched buffer and into fresh memory."""
    import h5py

    from ..data.h5 import collective, open_read
    from ..data.reader import _reader_threads, pread_rows, read_block, row_block
    from ..log import Log

    log = Log(comm.rank, comm.size)
    d = args.features
    start, stop = row_block(args.rows, comm.rank, comm.size)
    m = stop - start
    threads = _reader_threads(comm)
    X_pre = np.empty((m, d), dtype=np.float32)
    y_pre = np.empty(m, dtype=np.float64)
    X_pre.fill(0)  # touch the pages once: the raw read below measures reading, not first-touch
    y_pre.fill(0)

    def ours():
        read_block(args.h5, "X", "y", comm, log)

    def h5py_read(coll: bool):  # the bare HDF5 read of the same rows into fresh arrays, no checks
        with open_read(args.h5, comm) as fh:
            Xl = np.empty((m, d), dtype=np.float32)
            with collective(fh["X"]) if coll else contextlib.nullcontext():
                fh["X"].read_direct(Xl, np.s_[start:stop], np.s_[:])
            fh["y"][start:stop]

    def raw_preallocated():
        pread_rows(args.x_bin, 0, start, X_pre, threads)
        pread_rows(args.y_bin, 0, start, y_pre.reshape(m, 1), threads)

    def raw_fresh():  # what a plain loader does: read into new arrays
        pread_rows(args.x_bin, 0, start, np.empty((m, d), dtype=np.float32), threads)
        pread_rows(args.y_bin, 0, start, np.empty((m, 1), dtype=np.float64), threads)

    fns = {
        "ours": ours,
        "h5py": lambda: h5py_read(False),
        "h5py_collective": lambda: h5py_read(True),  # MPI-IO collective transfers
        "raw": raw_preallocated,
        "raw_fresh": raw_fresh,
    }
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(args.repeats + 1):  # the first round warms the page cache and is dropped
        for name, fn in fns.items():
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            comm.barrier()
            if rep:
                samples[name].append(time.perf_counter() - t0)
    with h5py.File(args.h5, "r") as fh:
        total = fh["X"].size * fh["X"].dtype.itemsize + fh["y"].size * fh["y"].dtype.itemsize
    figures = {}
    for name in fns:
        seconds = _median_max(comm, samples[name])
        figures[f"{name}_s"] = figure(seconds, "s")
        figures[f"{name}_GBps"] = figure(total / seconds / 1e9, "GB/s", note="bytes of X and y")
    return {
        "ranks": comm.size,
        "bytes": total,
        "driver": "mpio" if h5py.get_config().mpi else "sec2 (h5py not parallel)",
        "threads_per_rank": threads,
        "page_cache": "warm: every file read once before the timed rounds",
        "timings": {name: [round(s, 7) for s in samples[name]] for name in fns},
        "figures": figures,
    }


def step(args, comm: Communicator) -> dict:
    """The full-batch step of training, after warm-up: each rank's fused gradient over its block
    (threads as in training), then one allreduce of [gradient, loss, rows, stop, step] through the
    chosen backend. Steps run back to back as in the engine, so the allreduce time includes waiting
    for the slower rank. Also the time to load the block with ``read_block``."""
    import numba

    from ..comm import make_backend
    from ..data.reader import read_block
    from ..device import select_device
    from ..kernels import BINARY, SIGMOID, cpu
    from ..log import Log

    reducer = make_backend(args.backend, comm)
    device = select_device("cpu", 0, comm)
    log = Log(comm.rank, comm.size)
    params = bench_params(args.features)
    sizes = np.array([args.features, 1], dtype=np.int64)
    P = params.size
    buf = np.zeros(P + 4)
    result: dict = {"ranks": comm.size, "threads_per_rank": device.threads, "backend": args.backend}
    figures: dict = {}
    for label, path in (("strong", args.h5), ("weak", args.weak_h5)):
        if not path:
            continue
        if label == "weak":  # weak scaling: one core per rank, so resources grow with ranks
            numba.set_num_threads(1)
            result["weak_threads_per_rank"] = 1
        comm.barrier()
        t0 = time.perf_counter()
        block = read_block(path, "X", "y", comm, log)
        comm.barrier()
        io = float(max(comm.allgather(time.perf_counter() - t0)))
        compute, reduce = [], []
        for i in range(2 + max(5, 2 * args.repeats)):  # two warm-up steps, then the timed ones
            t0 = time.perf_counter()
            cpu.gradient(block.X, block.y, params, sizes, SIGMOID, BINARY, buf[: P + 2])
            t1 = time.perf_counter()
            reducer.allreduce_(buf)
            t2 = time.perf_counter()
            if i >= 2:
                compute.append(t1 - t0)
                reduce.append(t2 - t1)
        per_rank = comm.allgather((statistics.median(compute), statistics.median(reduce)))
        # Ranks split a step differently (the faster one waits in the allreduce): average them.
        c = statistics.fmean(x[0] for x in per_rank)
        r = statistics.fmean(x[1] for x in per_rank)
        rows = sum(comm.allgather(block.n))
        note = "mean over ranks of each rank's median"
        figures.update(
            {
                f"{label}_compute_step_s": figure(c, "s", note=note),
                f"{label}_comm_step_s": figure(r, "s", note=note + "; includes waiting"),
                f"{label}_step_s": figure(c + r, "s"),
                f"{label}_comm_share": figure(r / (c + r), "fraction", note="comm / step"),
                f"{label}_comm_share_max_rank": figure(
                    max(x[1] / (x[0] + x[1]) for x in per_rank), "fraction"
                ),
                f"{label}_io_s": figure(io, "s", note="read_block, slowest rank"),
                f"{label}_rows": figure(rows, "rows"),
            }
        )
        result[f"{label}_per_rank_median_s"] = per_rank
    result["figures"] = figures
    return result


@njit(parallel=True, cache=False)
def _load_rows(X, y, rows) -> float:
    """Load the first and last element of each of the rows (and its target): every cache line
    of a row of up to 128 bytes, with no copy and no arithmetic but one add a row; on the
    rank's threads, as the gather."""
    total = 0.0
    last = X.shape[1] - 1
    for i in prange(rows.size):
        r = rows[i]
        total += X[r, 0] + X[r, last] + y[r]
    return total


FLOOR_CALLS = 64  # the floor's median is over at least this many calls


def minibatch(args, comm: Communicator) -> dict:
    """The mini-batch step of training (global batch ``GLOBAL_BATCH``, the rank's threads as in
    training) taken apart, with training's own pieces: the epoch's batch plan
    (``data.batches.EpochBatches``), the batch as training takes it (``Device.taken_gather``:
    rows the gradient reads in place, where the kernels can; else ``BatchGather``'s copy), the
    gradient (``kernels.cpu``; it reads the rows of a batch taken in place), the allreduce
    and the update. Three epochs, the first a warm-up. Then the floor a step cannot go below on
    this machine: loading the cache lines of the same batches' rows from memory (random rows of
    the rank's block), with no copy and no compute (``_load_rows``): the median call of one
    pass over the epoch's batches (epochs of fewer than ``FLOOR_CALLS`` steps: of as many passes
    as make that many calls), so that one late call of a short epoch does not set it."""
    from ..data.batches import BatchGather, EpochBatches
    from ..data.reader import read_block
    from ..device import select_device
    from ..kernels import BINARY, SIGMOID
    from ..log import Log

    device = select_device("cpu", 0, comm)
    log = Log(comm.rank, comm.size)
    block = read_block(args.h5, "X", "y", comm, log)
    X, y = block.X, np.ascontiguousarray(block.y, dtype=np.float64)
    n_global = int(sum(comm.allgather(block.n)))
    plan = EpochBatches(
        range(block.start, block.start + block.n), n_global, GLOBAL_BATCH, 42, X[:1].nbytes + 8
    )
    params = bench_params(X.shape[1])  # the file's features
    sizes = np.array([X.shape[1], 1], dtype=np.int64)
    gather = device.taken_gather(X, y, sizes, BINARY) or BatchGather(X, y)
    P = params.size
    buf = np.zeros(P + 4)
    parts = dict.fromkeys(("plan", "gather", "gradient", "allreduce", "update"), 0.0)
    walls, steps, clock = [], 0, time.perf_counter
    for epoch in range(3):
        comm.barrier()
        t_epoch = clock()
        t0 = clock()
        batches = plan(epoch)
        spent = dict.fromkeys(parts, 0.0)
        spent["plan"] = clock() - t0
        for k in range(len(batches)):
            t0 = clock()
            rows = batches[k]
            t1 = clock()
            xb, yb = gather(rows)
            t2 = clock()
            device.gradient(xb, yb, params, sizes, SIGMOID, BINARY, buf[: P + 2])
            t3 = clock()
            comm.allreduce_(buf)
            t4 = clock()
            params -= 0.01 * buf[:P] / max(buf[P + 1], 1.0)
            t5 = clock()
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                spent[name] += dt
        if epoch:  # the first epoch warms up
            walls.append(clock() - t_epoch)
            steps += len(batches)
            for name in parts:
                parts[name] += spent[name]
    loads = []
    batches = plan(3)
    _load_rows(X, y, batches[0])
    comm.barrier()
    for _ in range(-(-FLOOR_CALLS // len(batches))):  # small epochs: passes again
        for k in range(len(batches)):
            t0 = clock()
            _load_rows(X, y, batches[k])
            loads.append(clock() - t0)
    per_rank = comm.allgather(
        {"wall": sum(walls) / steps, "floor": statistics.median(loads)}
        | {name: v / steps for name, v in parts.items()}
    )
    mean = {key: statistics.fmean(r[key] for r in per_rank) for key in per_rank[0]}
    step_s = max(r["wall"] for r in per_rank)
    note = "mean over ranks of each rank's mean a step"
    figures = {
        "step_s": figure(step_s, "s", note="epoch time / steps, slowest rank"),
        **{
            f"{name}_step_s": figure(
                mean[name], "s", note=note + ("; includes waiting" if name == "allreduce" else "")
            )
            for name in parts
        },
        "other_step_s": figure(
            max(0.0, step_s - sum(mean[name] for name in parts)), "s", note="the loop itself"
        ),
        "load_floor_step_s": figure(
            mean["floor"],
            "s",
            note="loading the batch's rows only (random lines, no copy): the median call",
        ),
    }
    return {
        "ranks": comm.size,
        "threads_per_rank": device.threads,
        "global_batch": GLOBAL_BATCH,
        "rows_in_place": not isinstance(gather, BatchGather),
        "steps_per_epoch": len(batches),
        "per_rank": per_rank,
        "figures": figures,
    }


def _sequential_read(path: str, piece: int = 8 << 20) -> float:
    """Seconds of one process reading the whole file in 8 MiB ``read`` calls (what ``dd
    bs=8M of=/dev/null`` does)."""
    buf = bytearray(piece)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass
    return time.perf_counter() - t0


def stream(args, comm: Communicator) -> dict:
    """``data.stream``'s read of a rank's rows, piece by piece with read-ahead (``RowStream``),
    from a cold file (its pages dropped) and from the page cache, against one process reading
    the same file sequentially from cold (dd's rate) and the page cache. The streaming pass is
    timed alone (no kernel): the file's bytes over the slowest rank's time."""
    from ..config import DataConfig
    from ..data.stream import RowStream

    cfg = DataConfig(train=args.h5, stream=True, buffer_mb=args.buffer_mb)
    rs = RowStream(cfg, 1, comm)
    size = os.path.getsize(args.h5)

    def one_pass() -> float:
        comm.barrier()
        t0 = time.perf_counter()
        for _ in rs.pieces():
            pass
        return float(max(comm.allgather(time.perf_counter() - t0)))

    # Cold reads alternate (dd, ours, dd, ours, ...): a virtual disk's own cache below the page
    # cache then favours neither; each figure is the median of its rounds. The device's rate
    # drifts (up to 2x from one minute to the next on a shared virtual disk), so the ratio is
    # taken round by round, each pass against the sequential read just before it, and the
    # median of those paired ratios is reported (``cold_vs_dd``).
    dd_cold, ours_cold = [], []
    for _ in range(COLD_ROUNDS):
        if comm.is_root:
            evict(args.h5)
            dd_cold.append(_sequential_read(args.h5))
            evict(args.h5)
        ours_cold.append(one_pass())
    dd_warm = _sequential_read(args.h5) if comm.is_root else 0.0
    warm = statistics.median([one_pass() for _ in range(max(1, args.repeats))])
    gb = size / 1e9
    figures = {
        "stream_cold_gbps": figure(
            gb / statistics.median(ours_cold), "GB/s", note=f"{comm.size} rank(s), cold file"
        ),
        "stream_warm_gbps": figure(gb / warm, "GB/s", note="from the page cache"),
    }
    if comm.is_root:
        dd = statistics.median(dd_cold)
        figures["dd_cold_gbps"] = figure(gb / dd, "GB/s", note="1 process, 8 MiB reads")
        paired = [seq / ours for seq, ours in zip(dd_cold, ours_cold, strict=True)]
        figures["cold_vs_dd"] = figure(
            statistics.median(paired),
            "x",
            note=f"median of {len(paired)} rounds' (sequential read time / streamed pass time)",
        )
        figures["dd_warm_gbps"] = figure(gb / dd_warm, "GB/s")
    return {"bytes": size, "buffer_mb": args.buffer_mb, "figures": figures}


COLD_ROUNDS = 5


PARTS = {
    "allreduce": allreduce,
    "hdf5": hdf5,
    "step": step,
    "minibatch": minibatch,
    "stream": stream,
}


def main() -> None:
    parser = part_parser(__doc__)
    parser.add_argument("--weak-h5", default="")
    parser.add_argument("--backend", default="mpi")
    parser.add_argument("--buffer-mb", type=float, default=64.0)
    args = parser.parse_args()
    comm = world()
    result = PARTS[args.part](args, comm)
    if comm.is_root:
        write_part(args.out, result)


if __name__ == "__main__":
    main()

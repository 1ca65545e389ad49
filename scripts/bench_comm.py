"""Time one training reduction per backend and compression, for a few buffer sizes.

    mpiexec -n 2 .venv/bin/python scripts/bench_comm.py [--sizes 1000,100000,1000000] [--repeat 50]

Each line of output (rank 0, JSON) gives the median seconds of one in-place sum of a float64
buffer of P values plus the 4-value tail, and the bytes each rank puts on the wire.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lepton_hpc.comm import make_backend, world
from lepton_hpc.comm.compression import make_reducer
from lepton_hpc.errors import LeptonError


def median_seconds(reduce, buf: np.ndarray, comm, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        comm.barrier()
        t0 = time.perf_counter()
        reduce(buf)
        times.append(time.perf_counter() - t0)
    # The slowest rank decides a step: take the max over ranks of each rank's median.
    return float(max(comm.allgather(float(np.median(times)))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--backends", default="mpi,horovod")
    args = ap.parse_args()
    comm = world()
    rng = np.random.default_rng(comm.rank)
    for backend in args.backends.split(","):
        try:
            reducer = make_backend(backend, comm)
        except LeptonError as exc:
            if comm.is_root:
                print(json.dumps({"backend": backend, "skipped": str(exc)}))
            continue
        for P in map(int, args.sizes.split(",")):
            for name in ("none", "fp16", "bf16"):
                red = make_reducer(name, reducer, P)
                buf = np.r_[rng.normal(size=P), 1.0, 1.0, 0.0, 0.0]
                seconds = median_seconds(red.allreduce_, buf, comm, args.repeat)
                wire = (P + 4) * 8 if name == "none" else 2 * P + 32
                if comm.is_root:
                    row = {"backend": backend, "ranks": comm.size, "P": P, "compression": name}
                    row.update(seconds=round(seconds, 7), message_bytes=wire)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Moving rows between ranks: each rank holds a contiguous run of global rows and gets another.

Used when rows arrive from the caller's own partition (the Python estimators) but the training
needs the toolkit's: reproducible mode gives every rank whole global blocks, so rows that sit on
the wrong rank are sent to the rank that owns their block. One ``alltoall`` per call, of only the
rows that move (a rank sends nothing to itself through MPI).
"""

from __future__ import annotations

import numpy as np

from .base import Communicator


def move_rows(
    comm: Communicator,
    arrays: list[np.ndarray],
    start: int,
    want: tuple[int, int],
) -> list[np.ndarray]:
    """Rows ``[want[0], want[1])`` of the global arrays whose rows ``[start, start + n)`` this
    rank holds (``n``: the arrays' common first dimension); ranks hold ascending runs.

    Returns new arrays in global row order (the inputs are not modified)."""
    n = arrays[0].shape[0] if arrays else 0
    if comm.size == 1 or comm.mpi_comm is None:
        lo, hi = want[0] - start, want[1] - start
        return [a[lo:hi] for a in arrays]
    wanted = comm.allgather((int(want[0]), int(want[1])))
    sends: list[list[np.ndarray] | None] = []
    for r, (lo, hi) in enumerate(wanted):
        a, b = max(lo - start, 0), min(hi - start, n)
        if r == comm.rank or b <= a:
            sends.append(None)
        else:
            sends.append([arr[a:b] for arr in arrays])
    received = comm.mpi_comm.alltoall(sends)
    own_lo, own_hi = max(want[0] - start, 0), min(want[1] - start, n)
    pieces: list[list[np.ndarray]] = []
    for r, got in enumerate(received):
        if r == comm.rank:
            if own_hi > own_lo:
                pieces.append([arr[own_lo:own_hi] for arr in arrays])
        elif got is not None:
            pieces.append(got)
    if not pieces:
        return [arr[:0] for arr in arrays]
    return [np.concatenate([p[i] for p in pieces]) for i in range(len(arrays))]

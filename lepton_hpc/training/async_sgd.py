"""Asynchronous training with bounded staleness (``comm.strategy = "async"``).

No rank waits for the others at each step. The shared copy of the model, its parameters and
the optimiser state, lives in an MPI window on rank 0 (``SharedModel``), with a small header:
``[version, stop, loss sum, rows, end]``. Every rank (rank 0 too) loops on its own rows:

1. compute the summed gradient of its next local batch at the parameters it last read
   (``version`` v);
2. ``push``: lock the window exclusively (passive target: rank 0 takes no part, so a busy or
   slow rank 0 holds nobody up), read it, and, when the shared version V is at most
   ``comm.max_staleness`` updates past v, apply the optimiser step to the shared state with this
   gradient (the rank's batch mean, plus L2) and write it back as version V + 1; a gradient
   staler than that is dropped (the rank waits for fresher parameters: it computes again on the
   current ones). Either way the rank leaves with the current parameters and version.

So every applied gradient was computed on parameters at most ``max_staleness`` updates old, and
a slow rank simply contributes fewer updates: the others never wait for it. An epoch is a
number of applied updates (``steps_per_epoch`` x ranks: as many rows as a sync epoch reads,
whichever ranks read them); the push that reaches it, or a rank that saw a stop signal, sets
``end`` in the header, and every rank then meets the others (a barrier), takes the final
shared state, and the loop computes the epoch's metrics and checkpoint as for any strategy. A
rank cycles through its own rows in the seeded order of ``EpochBatches`` (epoch after epoch of
its own; a fast rank reads its rows more often than a slow one).

Results depend on timing, so they are not reproducible (``comm.reproducible`` refuses
``async``); a checkpoint holds the shared state between epochs, and a resumed run goes on
from it. The window is reached with one-sided MPI (``MPI.Win.Allocate``); within a node Open
MPI serves it from shared memory without rank 0's help (measured: 8 us a lock, get, put and
unlock of 1,000 values), across nodes an MPI without a progress thread may serve it only when
rank 0 enters MPI.
"""

from __future__ import annotations

import numpy as np

HEADER = 5  # version, stop, loss sum, rows, end
VERSION, STOP, LOSS, ROWS, END = range(HEADER)


class SharedModel:
    """The shared parameters and optimiser state in a window on rank 0 of ``comm`` (mpi4py)."""

    def __init__(self, comm, opt, params: np.ndarray, version: int) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.opt = MPI, comm, opt
        self.P = params.size
        state = opt.state()
        # the optimiser's arrays of the parameters' length, in a fixed order, and its counters
        self.arrays = sorted(k for k, v in state.items() if np.shape(v) == (self.P,))
        self.scalars = sorted(k for k in state if k not in self.arrays)
        self.size = HEADER + len(self.scalars) + self.P * (1 + len(self.arrays))
        itemsize = 8
        nbytes = self.size * itemsize if comm.Get_rank() == 0 else 0
        self.win = MPI.Win.Allocate(nbytes, itemsize, comm=comm)
        self.buf = np.zeros(self.size)  # this rank's copy of the window
        if comm.Get_rank() == 0:
            self._store(params, state)
            self.buf[VERSION] = version
            self.win.Lock(0, MPI.LOCK_EXCLUSIVE)
            self.win.Put(self.buf, 0)
            self.win.Unlock(0)
        comm.Barrier()
        self.get()

    # ---- layout ---------------------------------------------------------------------------
    @property
    def params(self) -> np.ndarray:
        at = HEADER + len(self.scalars)
        return self.buf[at : at + self.P]

    def _array(self, i: int) -> np.ndarray:
        at = HEADER + len(self.scalars) + self.P * (1 + i)
        return self.buf[at : at + self.P]

    def _store(self, params: np.ndarray, state: dict) -> None:
        self.params[:] = params
        for i, key in enumerate(self.scalars):
            self.buf[HEADER + i] = float(state[key])
        for i, key in enumerate(self.arrays):
            self._array(i)[:] = state[key]

    def state(self) -> dict:
        """The optimiser state in this rank's copy (views of it)."""
        out = {key: np.array(self.buf[HEADER + i]) for i, key in enumerate(self.scalars)}
        out.update({key: self._array(i) for i, key in enumerate(self.arrays)})
        return out

    @property
    def version(self) -> int:
        return int(self.buf[VERSION])

    @property
    def ended(self) -> bool:
        return bool(self.buf[END])

    # ---- one-sided access ---------------------------------------------------------------
    def get(self) -> None:
        """This rank's copy := the window (a shared lock: readers do not exclude each other)."""
        self.win.Lock(0, self.MPI.LOCK_SHARED)
        self.win.Get(self.buf, 0)
        self.win.Unlock(0)

    def push(
        self,
        grad: np.ndarray | None,
        loss: float,
        rows: float,
        read: int,
        bound: int,
        target: int,
        stop: bool,
    ) -> tuple[bool, int]:
        """Apply ``grad`` (computed at version ``read``) to the shared state unless it is more
        than ``bound`` updates stale or the epoch has ended; ``target``: the version that ends
        the epoch; ``stop``: this rank saw a stop signal (ends the epoch for all). Returns
        (applied, staleness); this rank's copy is then the window's state."""
        MPI = self.MPI
        self.win.Lock(0, MPI.LOCK_EXCLUSIVE)
        try:
            self.win.Get(self.buf, 0)
            self.win.Flush(0)
            staleness = self.version - read
            applied = False
            if not self.ended and grad is not None and staleness <= bound:
                self.opt.load_state(self.state())
                self.opt.step(self.params, grad)
                self._store(self.params, self.opt.state())
                self.buf[VERSION] += 1
                self.buf[LOSS] += loss
                self.buf[ROWS] += rows
                applied = True
            if stop:
                self.buf[STOP] = 1.0
            if self.version >= target or stop:
                self.buf[END] = 1.0
            if applied or stop or self.buf[END]:
                self.win.Put(self.buf, 0)
        finally:
            self.win.Unlock(0)
        return applied, staleness

    def end_epoch(self) -> tuple[float, float, bool]:
        """Every rank, after the epoch's end: the final shared state in this rank's copy; the
        epoch's loss sum and rows and whether a rank saw a stop; rank 0 then clears the
        epoch's header (after a second barrier, so nobody reads it half-cleared)."""
        self.comm.Barrier()  # every rank has stopped pushing
        self.get()
        loss, rows, stop = float(self.buf[LOSS]), float(self.buf[ROWS]), bool(self.buf[STOP])
        self.comm.Barrier()
        if self.comm.Get_rank() == 0:
            self.win.Lock(0, self.MPI.LOCK_EXCLUSIVE)
            self.buf[[LOSS, ROWS, END, STOP]] = 0.0
            self.win.Put(self.buf, 0)
            self.win.Unlock(0)
        self.comm.Barrier()
        self.buf[[LOSS, ROWS, END, STOP]] = 0.0  # every rank's copy: the next epoch is open
        return loss, rows, stop

    def free(self) -> None:
        self.win.Free()

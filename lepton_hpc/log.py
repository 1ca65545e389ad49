"""Rank-aware output: rank 0 speaks, every rank can warn or fail with its rank id in the line.

One ``Log`` object is made per process from the communicator and passed where output is needed
(no module-level state). ``LEPTON_VERBOSE=1`` lets every rank print its info lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


class Log:
    """Print helpers that know the rank; info goes to stdout on rank 0 only."""

    def __init__(self, rank: int = 0, size: int = 1, stream: TextIO | None = None) -> None:
        self.rank = rank
        self.size = size
        self.is_root = rank == 0
        self.verbose = os.environ.get("LEPTON_VERBOSE", "") not in ("", "0")
        self._stream = stream
        self._t0 = time.perf_counter()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def info(self, message: str) -> None:
        """A progress or result line, printed by rank 0 (by every rank with LEPTON_VERBOSE=1)."""
        if self.is_root or self.verbose:
            prefix = "" if self.size == 1 or not self.verbose else f"[rank {self.rank}] "
            print(prefix + message, file=self.stream, flush=True)

    def warning(self, message: str, *, all_ranks: bool = False) -> None:
        """A warning on stderr; by default once (rank 0) because every rank sees the same thing."""
        if self.is_root or all_ranks:
            where = f" (rank {self.rank})" if all_ranks and self.size > 1 else ""
            print(f"lepton: warning{where}: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        """An error line with the rank id, printed by the rank that saw it."""
        where = f" (rank {self.rank} of {self.size})" if self.size > 1 else ""
        print(f"lepton: error{where}: {message}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

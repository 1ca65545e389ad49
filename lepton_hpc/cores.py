"""How many cores a rank may use (below ``device`` and ``data``, which both ask)."""

from __future__ import annotations

import os

from .comm.base import Communicator


def cores_available() -> int:
    """Cores this process may run on (its CPU binding), or all of the node's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(comm: Communicator) -> int:
    """Cores this rank may use: the node's cores shared by its ranks, within its CPU binding."""
    per_rank = max(1, (os.cpu_count() or 1) // max(comm.node_size, 1))
    return max(1, min(per_rank, cores_available()))

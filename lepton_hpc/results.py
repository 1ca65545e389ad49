"""The run directory, written by rank 0 only: status, metrics, results, model and plot.

``status.json`` is rewritten atomically at each change (running, completed, stopped at step N,
failed on rank R with error E) so job scripts can trust it more than mpirun's exit code.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import LeptonError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_run_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a run directory that may not be used."""
    if path.exists() and not path.is_dir():
        raise LeptonError(f"run directory '{path}' is a file")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise LeptonError(
            f"run directory '{path}' exists; pass --resume auto to continue it or --overwrite "
            "to replace it"
        )
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LeptonError(f"cannot create run directory '{path}': '{ancestor}' is a file")
    if not os.access(ancestor, os.W_OK):
        raise LeptonError(f"cannot create run directory '{path}': '{ancestor}' is not writable")


def create_run_dir(path: Path, *, overwrite: bool) -> None:
    """Create the run directory (rank 0), replacing an old one only with ``--overwrite``.

    Called once the inputs have been validated, so a bad input never destroys an old run.
    """
    if overwrite and path.is_dir():
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeptonError(f"cannot create run directory '{path}': {exc.strerror}") from None


class RunDir:
    """Paths and writers of a run directory; create it on rank 0 only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.status_file = self.path / "status.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.results_file = self.path / "results.json"
        self.model_file = self.path / "model.h5"
        self.plot_file = self.path / "history.png"

    def status(self, state: str, **fields: Any) -> None:
        write_json(
            self.status_file,
            {"status": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields},
        )

    def write_history(self, history: list[dict]) -> None:
        """metrics.jsonl: one JSON line per finished epoch (rewritten whole, so resume is clean)."""
        atomic_write_text(self.metrics_file, "".join(json.dumps(h) + "\n" for h in history))


def versions() -> dict[str, str]:
    """Versions of the stack, for results.json (lazy imports: only what is loaded anyway)."""
    import h5py
    import mpi4py
    import numba
    import numpy as np

    from . import __version__

    return {
        "lepton_hpc": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "h5py": h5py.version.version,
        "mpi4py": mpi4py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "h5py_parallel": str(h5py.get_config().mpi),
    }

"""Batch prediction over many files: one task per input file through the task farm.

``lepton predict --model M --data 'inputs/*.h5' --out outdir/`` runs, for each matching file,
exactly what ``lepton predict`` does for one file (``inference.predict_one``) on a worker group,
writing ``outdir/<input file name>``. Every output is written under a temporary name and renamed
when complete, so an interrupted batch never leaves a partial file under a final name.

A pattern (or list of files) with an ``--out`` that names an HDF5 file (``.h5``, ``.hdf5``) is not
a batch: the files are shards of one data set, predicted into that one file in row order.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .comm.base import Communicator, agree
from .errors import LeptonError
from .inference import predict_one
from .log import Log
from .safety import check_not_input
from .scheduler import Task, run_tasks

GLOB_CHARS = "*?["
HDF5_SUFFIXES = (".h5", ".hdf5", ".he5", ".hdf")


class BatchError(LeptonError):
    """Some files could not be predicted (every rank knows: the results are shared)."""

    collective = True


def is_batch(data, out: str) -> bool:
    """One output per input file: ``--out`` ends with '/', or ``--data`` is a glob pattern (or
    a list of files) and ``--out`` is not an HDF5 file name. A pattern or a list of files with
    ``--out`` an HDF5 file name (``.h5``, ``.hdf5``) is shards: one output. One plain file with
    an ``--out`` that is an existing directory stays one prediction (refused as a directory)."""
    if out.endswith(("/", os.sep)):
        return True
    if Path(out).suffix.lower() in HDF5_SUFFIXES:
        return False
    return not isinstance(data, str) or any(c in data for c in GLOB_CHARS)


def plan_outputs(
    pattern, outdir: str | Path, force: bool, model: str | Path | None = None
) -> list[tuple[str, str]]:
    """(input, output) pairs for the files matching ``pattern`` (or a list of files); checked
    before anything runs.

    No output may be one of the inputs or the model file, even with ``force``."""
    if not isinstance(pattern, str):
        files = [str(p) for p in pattern]
        pattern = ", ".join(files)
    elif any(c in pattern for c in GLOB_CHARS):
        files = sorted(glob.glob(pattern))
    else:
        files = [pattern]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise LeptonError(f"--data '{pattern}': no file matches")
    out = Path(outdir)
    pairs = [(f, str(out / Path(f).name)) for f in files]
    names = [o for _, o in pairs]
    if len(set(names)) != len(names):
        raise LeptonError(f"--data '{pattern}': two inputs have the same file name in '{out}'")
    by_id = {_file_id(f): ("data", f) for f in files}  # one stat each, not files x outputs
    if model and Path(model).exists():
        by_id.setdefault(_file_id(model), ("model", model))
    for _, o in pairs:
        if Path(o).exists() and _file_id(o) in by_id:
            role, src = by_id[_file_id(o)]
            check_not_input(o, {role: src}, "--out")  # raises, naming both files
    existing = [o for o in names if Path(o).exists()]
    if existing and not force:
        raise LeptonError(
            f"{len(existing)} output(s) exist, e.g. '{existing[0]}'; pass --force to replace them"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeptonError(f"--out: cannot create directory '{out}': {exc.strerror}") from None
    return pairs


def _file_id(path: str | Path) -> tuple[int, int]:
    """(device, inode): one file whatever links lead to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def predict_files(
    model_path: str,
    pattern,
    outdir: str,
    comm: Communicator,
    log: Log,
    force: bool,
    *,
    x: str | None = None,
    ranks_per_task: int = 1,
    retries: int = 1,
) -> list[str]:
    """Predict every file matching ``pattern`` into ``outdir``; the output paths, input order."""
    pairs = agree(
        comm, lambda: plan_outputs(pattern, outdir, force, model_path) if comm.is_root else None
    )
    pairs = comm.bcast(pairs)
    tasks = [
        Task(f"file-{i:04d}", {"model": model_path, "data": d, "out": o, "x": x, "force": force})
        for i, (d, o) in enumerate(pairs)
    ]
    results = run_tasks(
        tasks,
        _predict_task,
        comm,
        log,
        ranks_per_task=ranks_per_task,
        retries=retries,
        title="predict",
    )
    failed = [(t, r) for t, r in zip(tasks, results, strict=True) if not r.ok]
    if failed:
        listed = "; ".join(f"{t.payload['data']}: {r.error}" for t, r in failed[:3])
        raise BatchError(f"{len(failed)} of {len(tasks)} file(s) failed: {listed}")
    log.info(f"wrote {len(pairs)} prediction file(s) into {outdir}")
    return [o for _, o in pairs]


def _predict_task(task: Task, comm: Communicator, log: Log) -> str:  # noqa: ARG001
    """One file, on the ranks of ``comm``; quiet (the farm's progress speaks for it)."""
    p = task.payload
    with open(os.devnull, "w") as quiet:
        predict_one(
            p["model"], p["data"], p["out"], comm, Log(comm.rank, comm.size, quiet), p["force"],
            x=p["x"],
        )  # fmt: skip
    return p["out"]

"""``lepton sweep SWEEP.toml``: a grid or random search (optionally k-fold) as a task farm.

Each point (and fold) of the sweep is one training run into ``out/task-XXXX/``, handed by rank 0
to the next idle worker group (``lepton_hpc.scheduler``). Finished runs are journaled in
``out/journal.jsonl``, so running the same command again after an interruption trains only what
is missing or failed. At the end rank 0 writes ``sweep.csv``, ``sweep.json``, ``best.toml`` and
``sweep.png`` (``lepton_hpc.sweep.report``). Each run's own output goes to
``out/logs/task-XXXX.log`` (appended: one header per attempt).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ..comm.base import Communicator, agree
from ..errors import EXIT_FAILED, EXIT_USAGE, LeptonError
from ..log import Log
from ..scheduler.tasks import Task


def register_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="hyperparameter sweep (grid, random, k-fold) as a task farm over the ranks"
    )
    p.add_argument("sweep", help="sweep file (TOML): a base config and a [sweep] table")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides of the base config, e.g. train.epochs=5"
    )
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from ..scheduler import run_tasks
    from .report import write_report
    from .spec import load_sweep, sweep_tasks

    spec = agree(comm, lambda: load_sweep(args.sweep, args.overrides))
    agree(comm, lambda: _check_out(spec.out) if comm.is_root else None)
    tasks = sweep_tasks(spec)
    folds = f" x {spec.folds} folds" if spec.folds else ""
    log.info(
        f"lepton sweep {args.sweep}: {len(spec.points)} point(s){folds} = {len(tasks)} "
        f"training run(s) into {spec.out}/, {spec.metric} ({spec.mode})"
    )
    results = run_tasks(
        tasks,
        train_task,
        comm,
        log,
        ranks_per_task=spec.ranks_per_task,
        retries=spec.retries,
        journal=spec.out / "journal.jsonl",
        title="sweep",
    )
    failed = [r for r in results if not r.ok]
    missing = _metric_missing(spec.metric, results)
    if comm.is_root:
        if missing:
            log.error(missing)
        paths = write_report(spec, tasks, results, str(args.sweep))
        best = paths.get("best")
        log.info(f"wrote {', '.join(str(p) for p in paths.values())}")
        if best is not None:
            log.info(f"best config: {best}  (lepton train {best})")
        if failed:
            log.error(
                f"{len(failed)} of {len(tasks)} run(s) failed ({', '.join(r.id for r in failed)}): "
                f"see {spec.out}/sweep.json and {spec.out}/logs/; run the sweep again to retry them"
            )
    if missing:
        return EXIT_USAGE
    return EXIT_FAILED if failed else 0


def _check_out(out: Path) -> None:
    """The sweep's directory exists (created if needed) and is writable, before any run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeptonError(f"sweep.out: cannot create '{out}': {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise LeptonError(f"sweep.out: directory '{out}' is not writable")


def _metric_missing(metric: str, results: list) -> str:
    """A message when the runs did not report ``metric`` (e.g. val.r2 of a classifier)."""
    part, _, name = metric.partition(".")
    for r in results:
        if r.ok and name not in r.value["metrics"].get(part, {}):
            known = ", ".join(
                f"{p}.{n}"
                for p, m in r.value["metrics"].items()
                for n, v in m.items()
                if isinstance(v, float)
            )
            return f"sweep.metric '{metric}' is not reported by these runs (they report: {known})"
    return ""


def train_task(task: Task, comm: Communicator, log: Log) -> dict:  # noqa: ARG001
    """One training run of the sweep on the ranks of ``comm``; its log goes to its own file
    (``log``, the scheduler's stdout log, is not used: many runs at once would interleave)."""
    from ..config import check_config, config_from_dict, merge_overrides
    from ..engine import train

    payload = task.payload
    cfg = check_config(config_from_dict(merge_overrides(payload["base"], payload["overrides"])))
    log_path = Path(payload["log"])
    agree(comm, lambda: _make_task_dir(Path(cfg.output.dir)) if comm.is_root else None)
    with _task_log(log_path, comm) as stream:
        if comm.is_root:
            stream.write(f"== {task.id}: attempt at {time.strftime('%Y-%m-%dT%H:%M:%S')} ==\n")
            stream.flush()
        # overwrite: the journal says this run is not done, so its directory is a partial run
        # of the sweep's (marked); an unmarked directory there is not ours and is refused
        results = train(cfg, comm, Log(comm.rank, comm.size, stream=stream), overwrite=True)
    return {"metrics": results["metrics"], "epochs": results["epochs"], "steps": results["steps"]}


def _make_task_dir(path: Path) -> None:
    """Create a task's run directory with the run-directory marker, in one step (a sweep killed
    meanwhile leaves no unmarked directory); an existing one is left as it is (marked: an
    earlier attempt of the sweep's; unmarked: not the sweep's, then refused)."""
    from ..safety import make_marked_dir

    try:
        make_marked_dir(path)
    except OSError as exc:
        raise LeptonError(f"cannot create run directory '{path}': {exc.strerror}") from None


@contextlib.contextmanager
def _task_log(path: Path, comm: Communicator) -> Iterator[TextIO]:
    """The task's log file on its group's rank 0 (appended), /dev/null on the other ranks."""
    if comm.is_root:
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") if comm.is_root else open(os.devnull, "w") as fh:
        yield fh

"""A sweep's results in one place: sweep.csv, sweep.json, best.toml and sweep.png (rank 0).

One row per point of the sweep (folds averaged), sorted by the chosen metric, best first; failed
points come last. ``sweep.csv`` holds only what the runs computed (swept values and metrics, no
timings or worker ids), so the same sweep gives the same file on any number of ranks.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..config import merge_overrides
from ..results import atomic_write_text, write_json
from ..scheduler import Task, TaskResult
from .spec import SweepSpec
from .toml_writer import dumps, toml_value

SKIPPED_METRICS = ("confusion", "rows")  # not averaged over folds nor shown in the csv


def aggregate(spec: SweepSpec, tasks: list[Task], results: list[TaskResult]) -> list[dict]:
    """One row per point: swept values, metrics (mean over folds), status; best first."""
    by_point: dict[int, list[TaskResult]] = {}
    for task, result in zip(tasks, results, strict=True):
        by_point.setdefault(task.payload["point"], []).append(result)
    rows = []
    for point, runs in sorted(by_point.items()):
        ok = all(r.ok for r in runs)
        row: dict[str, Any] = {"point": point, "values": spec.points[point]}
        row["status"] = "ok" if ok else "failed"
        row["tasks"] = [r.id for r in runs]
        row["metrics"] = _mean_metrics([r.value["metrics"] for r in runs]) if ok else {}
        row["score"] = row["metrics"].get(spec.metric_part, {}).get(spec.metric_name)
        if ok and spec.folds:
            row["score_std"] = _std(
                [r.value["metrics"][spec.metric_part][spec.metric_name] for r in runs]
            )
        if not ok:
            row["error"] = next(r.error for r in runs if not r.ok)
        rows.append(row)
    sign = -1.0 if spec.mode == "max" else 1.0

    def order(row: dict) -> tuple:
        score = row["score"]
        good = isinstance(score, float) and math.isfinite(score)
        return (0, sign * score, row["point"]) if good else (1, 0.0, row["point"])

    rows.sort(key=order)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def write_report(
    spec: SweepSpec, tasks: list[Task], results: list[TaskResult], source: str
) -> dict[str, Path]:
    """Write every output of the sweep into ``spec.out``; returns their paths."""
    rows = aggregate(spec, tasks, results)
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sweep.csv", "json": out / "sweep.json"}
    atomic_write_text(paths["csv"], to_csv(spec, rows))
    best = rows[0] if rows and isinstance(rows[0]["score"], float) else None
    write_json(
        paths["json"],
        {
            "sweep": source,
            "metric": spec.metric,
            "mode": spec.mode,
            "folds": spec.folds,
            "keys": spec.keys,
            "best": best,
            "rows": rows,
            "tasks": [_task_entry(t, r) for t, r in zip(tasks, results, strict=True)],
        },
    )
    if best is not None:
        paths["best"] = out / "best.toml"
        atomic_write_text(paths["best"], best_toml(spec, best, source))
    from .plot import plot_sweep

    if plot_sweep(spec, rows, out / "sweep.png"):
        paths["plot"] = out / "sweep.png"
    return paths


def to_csv(spec: SweepSpec, rows: list[dict]) -> str:
    """Rank, point, swept values, the metric (and its std over folds), status, other metrics."""
    others = sorted(
        {f"{part}.{name}" for row in rows for part, m in row["metrics"].items() for name in m}
        - {spec.metric}
    )
    header = ["rank", "point", *spec.keys, spec.metric]
    header += [f"{spec.metric}_std"] if spec.folds else []
    header += ["status", *others]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line = [row["rank"], row["point"], *(_cell(row["values"][k]) for k in spec.keys)]
        line.append(_cell(row["score"]))
        line += [_cell(row.get("score_std"))] if spec.folds else []
        line.append(row["status"])
        for name in others:
            part, _, metric = name.partition(".")
            line.append(_cell(row["metrics"].get(part, {}).get(metric)))
        writer.writerow(line)
    return buf.getvalue()


def best_toml(spec: SweepSpec, best: dict, source: str) -> str:
    """The base config with the best point's values: ``lepton train best.toml`` trains it."""
    overrides = [f"{k}={toml_value(v)}" for k, v in best["values"].items()]
    overrides.append(f"output.dir={spec.out / 'best'}")
    config = merge_overrides(spec.base, overrides)
    score = f"{best['score']:.6g}" + (
        f" ± {best['score_std']:.3g} over {spec.folds} folds" if spec.folds else ""
    )
    header = (
        f"Best point of the sweep {source}: {spec.metric} = {score} ({spec.mode}),\n"
        f"point {best['point']}: " + ", ".join(overrides[:-1]) + "\n"
        f"Train it: lepton train {spec.out / 'best.toml'}"
    )
    return dumps(config, header)


def _mean_metrics(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each scalar metric averaged over the runs (one run: the values themselves)."""
    first = runs[0]
    out: dict[str, dict[str, float]] = {}
    for part, metrics in first.items():
        out[part] = {}
        for name, value in metrics.items():
            if name in SKIPPED_METRICS or not isinstance(value, int | float):
                continue
            values = [float(r[part][name]) for r in runs]
            out[part][name] = values[0] if len(values) == 1 else math.fsum(values) / len(values)
    return out


def _std(values: list[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple | dict | bool):
        return toml_value(value)
    return str(value)


def _task_entry(task: Task, result: TaskResult) -> dict:
    return {
        "id": task.id,
        "point": task.payload["point"],
        "fold": task.payload["fold"],
        "status": result.status,
        "attempts": result.attempts,
        "retried": result.retried,
        "workers": result.workers,
        "seconds": round(result.seconds, 3),
        "from_journal": result.from_journal,
        "error": result.error,
        "dir": task.payload["dir"],
    }

"""Sweep files: a base training config, the values to try, and what "best" means.

```toml
base = "jobs/configs/demo.toml"        # or inline tables: [base.data], [base.model], ...
[sweep]
grid = {"optim.lr" = [0.1, 0.01], "model.hidden" = [[16], [32, 16]]}   # every combination
# random = {"optim.lr" = {log_uniform = [1e-4, 1e-1]}, "model.l2" = {uniform = [0, 0.01]}}
# samples = 8                          # random points, drawn from a generator seeded by `seed`
metric = "val.accuracy"                # part.name: train|val|test . accuracy|f1|log_loss|mse|r2|...
mode = "max"                           # or "min"
folds = 0                              # k >= 2: k-fold cross-validation of every point
ranks_per_task = 1
retries = 1
out = "runs/sweep"
```

Paths (``base``, ``out``, and the data files of the config) are relative to the directory
``lepton`` runs in, like those of a training config. Everything here is pure: the same file gives
the same points in the same order on every rank and in every rerun.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SECTIONS, check_config, config_from_dict, merge_overrides, read_toml
from ..errors import ConfigError
from ..scheduler import Task
from .toml_writer import toml_value

METRIC_PARTS = ("train", "val", "test")
METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "log_loss", "mse", "rmse", "mae", "r2")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SWEEP_KEYS = (
    "grid", "random", "samples", "seed", "metric", "mode", "folds", "ranks_per_task", "retries",
    "out",
)  # fmt: skip


@dataclass(slots=True)
class SweepSpec:
    """A parsed sweep file: the base config and one dict of {dotted key: value} per point."""

    base: dict[str, Any]
    points: list[dict[str, Any]]
    keys: list[str]
    metric: str = "val.accuracy"
    mode: str = "max"
    folds: int = 0
    ranks_per_task: int = 1
    retries: int = 1
    out: Path = Path("runs/sweep")
    log_keys: set[str] = field(default_factory=set)  # swept on a log scale (for the plot)

    @property
    def metric_part(self) -> str:
        return self.metric.partition(".")[0]

    @property
    def metric_name(self) -> str:
        return self.metric.partition(".")[2]


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read and check a sweep file; ``overrides`` (``section.key=value``) apply to the base."""
    raw = read_toml(path)
    base = raw.get("base", {})
    if isinstance(base, str):
        base = read_toml(base)
    if overrides and isinstance(base, dict):
        base = merge_overrides(base, list(overrides))
    return parse_sweep({**raw, "base": base})


def parse_sweep(raw: dict[str, Any]) -> SweepSpec:
    for key in raw:
        if key not in ("base", "sweep"):
            raise ConfigError(key, "unknown top-level key of a sweep file (known: base, sweep)")
    base, sweep = raw.get("base", {}), raw.get("sweep")
    if not isinstance(base, dict):
        raise ConfigError("base", "expected a config file name or [base.*] tables")
    if not isinstance(sweep, dict):
        raise ConfigError("sweep", "a sweep file needs a [sweep] table")
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{key}", f"unknown key (known: {', '.join(SWEEP_KEYS)})")
    grid, random = sweep.get("grid"), sweep.get("random")
    if (grid is None) == (random is None):
        raise ConfigError("sweep", "give either sweep.grid or sweep.random (with samples)")
    if grid is not None:
        keys, points, log_keys = list(_table(grid, "sweep.grid")), grid_points(grid), set()
    else:
        samples = _integer(sweep, "samples", None, 1)
        seed = _integer(sweep, "seed", 0, 0)
        keys = list(_table(random, "sweep.random"))
        points = random_points(random, samples, seed)
        log_keys = {k for k, d in random.items() if "log_uniform" in d}
    spec = SweepSpec(
        base=base,
        points=points,
        keys=keys,
        metric=_string(sweep, "metric", "val.accuracy"),
        mode=_string(sweep, "mode", "max"),
        folds=_integer(sweep, "folds", 0, 0),
        ranks_per_task=_integer(sweep, "ranks_per_task", 1, 1),
        retries=_integer(sweep, "retries", 1, 0),
        out=Path(_string(sweep, "out", "runs/sweep")),
        log_keys=log_keys,
    )
    _check_spec(spec)
    return spec


def grid_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    for key, values in _table(grid, "sweep.grid").items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key}", "expected a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def random_points(random: dict[str, Any], samples: int, seed: int) -> list[dict[str, Any]]:
    """``samples`` points; point i is the same for a given seed whatever the other settings."""
    table = _table(random, "sweep.random")
    rng = np.random.default_rng(seed)
    return [
        {key: _draw(rng, dist, f"sweep.random.{key}") for key, dist in table.items()}
        for _ in range(samples)
    ]


def _draw(rng: np.random.Generator, dist: Any, key: str) -> Any:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(key, f"expected one of {{{', '.join(DISTRIBUTIONS)} = ...}}")
    (kind, args), = dist.items()  # fmt: skip
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(key, "choice needs a non-empty list")
        return args[int(rng.integers(len(args)))]
    ok = isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)
    if not ok or args[0] > args[1]:
        raise ConfigError(key, f"{kind} needs [low, high] with low <= high, got {args!r}")
    low, high = args
    if kind == "int_uniform":
        return int(rng.integers(int(low), int(high) + 1))
    if kind == "log_uniform":
        if low <= 0:
            raise ConfigError(key, "log_uniform needs low > 0")
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return float(rng.uniform(low, high))


def _check_spec(spec: SweepSpec) -> None:
    part, _, name = spec.metric.partition(".")
    if part not in METRIC_PARTS or name not in METRIC_NAMES:
        raise ConfigError(
            "sweep.metric",
            f"{spec.metric!r} is not part.name with part in {', '.join(METRIC_PARTS)} "
            f"and name in {', '.join(METRIC_NAMES)}",
        )
    if spec.mode not in ("max", "min"):
        raise ConfigError("sweep.mode", f"{spec.mode!r} is not 'max' or 'min'")
    if spec.folds == 1:
        raise ConfigError("sweep.folds", "k-fold cross-validation needs folds >= 2 (0 = off)")
    for key in spec.keys:
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name or "." in name:
            raise ConfigError(f"sweep: '{key}'", "swept keys are section.key of a training config")
        if key in ("output.dir", "data.fold", "data.folds"):
            raise ConfigError(f"sweep: '{key}'", "is set by the sweep itself")
    for point in spec.points:  # every value of every key, as `lepton train` would check it
        config_for(spec, point, 0 if spec.folds else None, spec.out / "check")
    data = spec.base.get("data", {})
    if spec.metric_part == "val" and not (spec.folds or data.get("validation_fraction", 0)):
        raise ConfigError("sweep.metric", "a val metric needs data.validation_fraction or folds")
    if spec.metric_part == "test" and not data.get("test"):
        raise ConfigError("sweep.metric", "a test metric needs data.test in the base config")


def overrides_for(
    spec: SweepSpec, point: dict[str, Any], fold: int | None, run_dir: Path
) -> list[str]:
    """The dotted ``key=value`` overrides (TOML values) that make the base config one task."""
    items = [f"{key}={toml_value(value)}" for key, value in point.items()]
    if fold is not None:
        items += [f"data.folds={spec.folds}", f"data.fold={fold}", "data.validation_fraction=0.0"]
    return [*items, f"output.dir={run_dir}"]


def config_for(spec: SweepSpec, point: dict[str, Any], fold: int | None, run_dir: Path):
    """The validated ``Config`` of one task (the same checks as ``lepton train``)."""
    raw = merge_overrides(spec.base, overrides_for(spec, point, fold, run_dir))
    return check_config(config_from_dict(raw))


def sweep_tasks(spec: SweepSpec) -> list[Task]:
    """One task per (point, fold); ids task-0000.. in point-major order."""
    folds: list[int | None] = list(range(spec.folds)) if spec.folds else [None]
    tasks = []
    for index, point in enumerate(spec.points):
        for fold in folds:
            tid = f"task-{len(tasks):04d}"
            payload = {
                "point": index,
                "fold": fold,
                "base": spec.base,
                "overrides": overrides_for(spec, point, fold, spec.out / tid),
                "dir": str(spec.out / tid),
                "log": str(spec.out / "logs" / f"{tid}.log"),
            }
            tasks.append(Task(tid, payload))
    return tasks


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(key, "expected a non-empty table of dotted keys")
    return value


def _string(table: dict, key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"sweep.{key}", f"expected a string, got {value!r}")
    return value


def _integer(table: dict, key: str, default: int | None, minimum: int) -> int:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"sweep.{key}", "is required")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"sweep.{key}", f"expected an integer >= {minimum}, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = ["SweepSpec", "load_sweep", "parse_sweep", "sweep_tasks"]

"""``sweep.png``: the sweep's metric against each swept value, one panel per key (rank 0)."""

from __future__ import annotations

from pathlib import Path

from ..plot import pyplot, save_figure
from .spec import SweepSpec
from .toml_writer import toml_value


def plot_sweep(spec: SweepSpec, rows: list[dict], path: Path) -> bool:
    """Draw with matplotlib's Agg backend; False if matplotlib is missing or nothing succeeded."""
    plt = pyplot()
    if plt is None:
        return False
    done = [r for r in rows if r["status"] == "ok" and r["score"] is not None]
    if not done:
        return False
    n = len(spec.keys)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    best = done[0]
    for ax, key in zip(axes[0], spec.keys, strict=True):
        xs = [r["values"][key] for r in done]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
        if not numeric:  # lists, strings, booleans: one position per distinct value
            labels = sorted({toml_value(x) for x in xs})
            xs = [labels.index(toml_value(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ys = [r["score"] for r in done]
        errs = [r.get("score_std", 0.0) for r in done]
        ax.errorbar(xs, ys, yerr=errs if spec.folds else None, fmt="o", alpha=0.75)
        bx = xs[0]
        ax.plot([bx], [best["score"]], "r*", markersize=14, label="best")
        if numeric and (key in spec.log_keys or _spans_decades(xs)):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=spec.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{spec.metric} ({spec.mode}) over {len(done)} point(s)")
    save_figure(fig, path)
    return True


def _spans_decades(xs: list[float]) -> bool:
    positive = [x for x in xs if x > 0]
    return len(positive) == len(xs) and max(positive) / min(positive) >= 100

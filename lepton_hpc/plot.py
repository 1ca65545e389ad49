"""``history.png``: loss and a quality metric against epoch, train and validation (rank 0)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None without matplotlib."""
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_history(history: list[dict], path: Path, classifier: bool) -> bool:
    """Draw the training history with matplotlib's Agg backend; False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    epochs = [h["epoch"] for h in history]
    metric = "accuracy" if classifier else "r2"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], "o-", label="train (running)")
    for part, style in (("val", "s--"),):
        if history and history[0].get(part):
            key = "log_loss" if classifier else "mse"
            ax1.plot(epochs, [h[part][key] for h in history], style, label=part)
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    for part, style in (("train", "o-"), ("val", "s--")):
        if history and history[0].get(part):
            ax2.plot(epochs, [h[part][metric] for h in history], style, label=part)
    ax2.set(xlabel="epoch", ylabel=metric, title="Accuracy" if classifier else "R²")
    ax2.legend()
    save_figure(fig, path)
    return True


def save_figure(fig, path: Path) -> None:
    """Lay out, save atomically and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    from .safety import atomic_file

    try:
        fig.tight_layout()
        with atomic_file(Path(path)) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)

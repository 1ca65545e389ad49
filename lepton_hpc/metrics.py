"""Exact metrics across ranks, built from allreduced integer counts and float64 sums.

Never an average of per-rank metrics: each rank contributes counts (confusion matrix) or sums,
one allreduce combines them, and the metric is computed once from the global totals. Float sums
are exact (``exact_sums``), so a metric has the same bits for any rank count.
"""

from __future__ import annotations

import numba
import numpy as np

from .comm.base import Communicator
from .exact import ExactSums, exact_sums
from .metric_kernels import EPS, classification_sums, regression_sums  # noqa: F401 - EPS


def predicted_labels(out: np.ndarray, head: str) -> np.ndarray:
    """Class ids from model outputs: threshold 0.5 (binary) or argmax (softmax)."""
    if head == "binary":
        return (out[:, 0] >= 0.5).astype(np.int64)
    return np.argmax(out, axis=1).astype(np.int64)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int, comm: Communicator) -> np.ndarray:
    """Global k x k confusion matrix (rows: true class, columns: predicted), int64."""
    cm = np.bincount(y_true.astype(np.int64) * k + y_pred, minlength=k * k).astype(np.int64)
    return comm.allreduce_(cm).reshape(k, k)


def from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and precision, recall, F1: of class 1 when binary, macro-averaged otherwise."""
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(axis=0).astype(np.float64)
    true = cm.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred > 0, tp / pred, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    if cm.shape[0] == 2:
        p, r, f = precision[1], recall[1], f1[1]
    else:
        p, r, f = precision.mean(), recall.mean(), f1.mean()
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
    }


class MetricSums:
    """The exact global metrics of a model head, summed a piece of rows at a time.

    ``add(y, out)`` for each piece (targets and the model's outputs), then ``result(comm)``
    (collective): confusion counts and exact float sums (``ExactSums``) are integers underneath,
    so the pieces' order and sizes never change a bit, and one piece is the whole-array metric.
    Regression's R² needs the global target mean first: ``y_mean`` (``target_mean``), from an
    earlier pass over the same rows.
    """

    def __init__(self, head: str, k: int, y_mean: np.ndarray | None = None) -> None:
        self.head, self.k, self.y_mean = head, k, y_mean
        self.cm = np.zeros(k * k if head != "squared" else 0, dtype=np.int64)
        self.sums = ExactSums(1 if head != "squared" else 3)
        self.n = 0

    def add(self, y: np.ndarray, out: np.ndarray) -> None:
        out = np.ascontiguousarray(out, dtype=np.float64)
        if self.head == "squared":
            y2 = np.ascontiguousarray(_column(y, out), dtype=np.float64)
            mean = np.asarray(self.y_mean, dtype=np.float64)
            regression_sums(y2, out, mean, self.sums.bins, numba.get_num_threads())
            self.n += y2.shape[0]
            return
        labels = np.ascontiguousarray(y, dtype=np.float64).reshape(-1)
        binary = self.head == "binary"
        threads = numba.get_num_threads()
        classification_sums(labels, out, binary, self.k, self.cm, self.sums.bins[0], threads)

    def result(self, comm: Communicator) -> dict:
        if self.head == "squared":
            return self._regression(comm)
        cm = comm.allreduce_(self.cm.copy()).reshape(self.k, self.k)
        rows = int(cm.sum())
        return {
            **from_confusion(cm),
            "log_loss": float(self.sums.total(comm)[0] / max(rows, 1)),
            "confusion": cm.tolist(),
            "rows": rows,
        }

    def _regression(self, comm: Communicator) -> dict:
        n = int(comm.allreduce_(np.array([self.n], dtype=np.int64))[0])
        sums = self.sums.total(comm)
        outputs = self.y_mean.size
        cells = max(n * outputs, 1)
        mse = sums[0] / cells
        r2 = 1.0 - sums[0] / sums[2] if sums[2] > 0 else 0.0
        return {
            "mse": float(mse),
            "rmse": float(np.sqrt(mse)),
            "mae": float(sums[1] / cells),
            "r2": float(r2),
            "rows": int(n),
        }


def _column(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Targets shaped as the outputs: (n,) targets of a one-output model as (n, 1)."""
    return y.reshape(out.shape) if y.ndim == out.ndim else y[:, None]


def target_mean(y_sums: ExactSums, n: int, comm: Communicator) -> np.ndarray:
    """The global mean of each target column from its exact sums over ``n`` rows (collective)."""
    return y_sums.total(comm) / max(n, 1)


def classification_metrics(
    y: np.ndarray, out: np.ndarray, head: str, k: int, comm: Communicator
) -> dict:
    """Exact global classification metrics and mean log-loss for outputs ``out``."""
    sums = MetricSums(head, k)
    sums.add(y, out)
    return sums.result(comm)


def regression_metrics(y: np.ndarray, out: np.ndarray, comm: Communicator) -> dict:
    """Exact global MSE, RMSE, MAE and R² (two passes: the global mean first, then sums)."""
    y2 = _column(y, out)
    n = int(comm.allreduce_(np.array([y2.shape[0]], dtype=np.int64))[0])
    mean = exact_sums(list(y2.T), comm) / max(n, 1)
    sums = MetricSums("squared", 0, mean)
    sums.add(y, out)
    return sums.result(comm)


def compute_metrics(y: np.ndarray, out: np.ndarray, head: str, k: int, comm: Communicator) -> dict:
    """The metrics for a model's head: classification counts or regression sums."""
    if head == "squared":
        return regression_metrics(y, out, comm)
    return classification_metrics(y, out, head, k, comm)


def headline(metrics: dict) -> str:
    """A short human line: accuracy/F1 for classifiers, MSE/R² for regression."""
    if "accuracy" in metrics:
        return (
            f"accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f}  "
            f"log_loss {metrics['log_loss']:.4f}"
        )
    return f"mse {metrics['mse']:.6g}  r2 {metrics['r2']:.4f}"

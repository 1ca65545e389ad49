"""A trained ``model.h5`` in-process: predict, evaluate and export from Python, without MPI.

``load_model(path)`` reads and verifies the file exactly as ``lepton predict`` does (a format-2
file must pass its checksum) and returns a ``Model``. Its methods take a NumPy array or the path
of an HDF5 file and run the very code the command line runs on one rank (the single-process
communicator: no ``mpiexec``, and mpi4py is never imported):

- an HDF5 path is read, scaled and checked by ``inference.load_rows``, the function behind
  ``lepton predict`` and ``lepton evaluate``;
- an array is converted the way the HDF5 reader converts a data set (float32 and float64 kept,
  other numeric types read as float32, a 1-D array is one feature, NaN/Inf rows refused) and
  scaled by the same ``Scaler.apply``;
- outputs come from ``inference.forward`` and metrics from ``inference.evaluate``.

So ``predict`` gives bit for bit the ``labels`` (classifiers) or ``predictions`` (regressors) that
``lepton predict`` writes for the same rows, and ``evaluate`` the dict ``lepton evaluate --json``
writes under ``metrics``.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..comm.base import SerialComm
from ..data.preprocess import Scaler
from ..errors import DataError, LeptonError

__all__ = ["Model", "load_model"]

PathLike = str | os.PathLike


def load_model(path: PathLike) -> Model:
    """Read a trained ``model.h5`` (a run directory's, or any ``lepton`` model file).

    A missing, damaged or altered file (format 2 carries a sha256 of its contents) raises one
    ``LeptonError`` naming the file. A format-1 file (no checksum) loads with a warning.
    """
    from ..models.io import load_model as read_model

    p = Path(os.fspath(path))
    spec, params, scaler, meta = read_model(p)
    if isinstance(meta, dict) and meta.get("unverified"):
        warnings.warn(
            f"model file '{p}' is unverified ({meta['unverified']})", UserWarning, stacklevel=2
        )
    return Model(p, spec, params, scaler, meta if isinstance(meta, dict) else {})


class Model:
    """A trained model held in memory; see the module docstring for what each method matches.

    Read-only attributes: ``path``, ``kind`` ("linear", "logistic", "softmax", "mlp"),
    ``task`` ("regression", "binary", "multiclass"), ``activation`` (MLPs; None otherwise),
    ``hidden``, ``sizes``, ``n_features_in_``, ``n_outputs_``, ``classes_`` and ``n_classes_``
    (classifiers), ``scaler``, ``params``, ``config`` and ``meta``. The arrays handed out are
    read-only copies: nothing a caller does changes what the model predicts.
    """

    def __init__(self, path: Path, spec, params: np.ndarray, scaler: Scaler, meta: dict) -> None:
        self._path = Path(path)
        self._spec = spec
        self._params = np.ascontiguousarray(params, dtype=np.float64)
        self._scaler = scaler
        self._meta = meta
        self._device = None

    # ---- attributes ------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The model file this model was read from."""
        return self._path

    @property
    def kind(self) -> str:
        return self._spec.kind

    @property
    def head(self) -> str:
        """The output head: "squared" (regression), "binary" (sigmoid) or "softmax"."""
        return self._spec.head

    @property
    def task(self) -> str:
        return {"squared": "regression", "binary": "binary", "softmax": "multiclass"}[self.head]

    @property
    def is_classifier(self) -> bool:
        return self._spec.is_classifier

    @property
    def activation(self) -> str | None:
        """Hidden-layer activation of an MLP; None for the one-layer models, which have none."""
        return self._spec.activation if self.kind == "mlp" else None

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths: features, hidden widths, outputs."""
        return tuple(self._spec.sizes)

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self._spec.sizes[1:-1])

    @property
    def n_features_in_(self) -> int:
        return self._spec.n_features

    @property
    def n_outputs_(self) -> int:
        """Columns of the model output (1 for a binary classifier: the probability of class 1)."""
        return self._spec.n_outputs

    @property
    def n_classes_(self) -> int:
        return len(self.classes_)

    @property
    def classes_(self) -> np.ndarray:
        """The class ids 0..k-1 a classifier predicts (labels are always these ids)."""
        if not self.is_classifier:
            raise AttributeError(f"'{self._path}' is a regression model: it has no classes_")
        return np.arange(self._spec.n_classes, dtype=np.int64)

    @property
    def scaler(self) -> Scaler:
        """The feature scaling fitted in training: x' = (x - shift) / scale (a copy)."""
        s = self._scaler
        return Scaler(s.kind, _frozen(s.shift), _frozen(s.scale))

    @property
    def params(self) -> np.ndarray:
        """The flat float64 parameter vector (layout: ``lepton_hpc.kernels``), read-only copy."""
        return _frozen(self._params)

    @property
    def config(self) -> dict:
        """The training config (sections as dicts), as stored in the model file."""
        return copy.deepcopy(self._meta.get("config", {}))

    @property
    def meta(self) -> dict:
        """Everything the model file records about its training (config, data fingerprint...)."""
        return copy.deepcopy(self._meta)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W, b) of each dense layer: W is fan_in x fan_out (x @ W + b), read-only copies."""
        return [
            (_frozen(self._params[w].reshape(a, b)), _frozen(self._params[bias]))
            for w, bias, a, b in self._spec.layers()
        ]

    def __repr__(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return (
            f"Model(path='{self._path}', kind={self.kind!r}, task={self.task!r}, "
            f"sizes={self.sizes}{act}, scaler={self._scaler.kind!r})"
        )

    # ---- inference -------------------------------------------------------------------------
    def outputs(self, X: Any, *, x: str | None = None) -> np.ndarray:
        """Model outputs, float64 (rows x n_outputs_): exactly the ``probabilities``
        (classifiers) or ``predictions`` (regressors) data set ``lepton predict`` writes."""
        from ..inference import forward

        Xs, _ = self._rows(X, None, x=x, with_y=False)
        return forward(self._spec, self._params, Xs, self._cpu())

    def predict(self, X: Any, *, x: str | None = None) -> np.ndarray:
        """Class ids (int64, one per row) for a classifier, as ``lepton predict``'s ``labels``;
        values for a regressor: one per row, or rows x outputs for several targets.

        ``X``: an array (rows x features; 1-D is one feature, as in an HDF5 file) or the path
        of an HDF5 file; ``x`` names its features data set (default: as in training).
        """
        from ..metrics import predicted_labels

        out = self.outputs(X, x=x)
        if self.is_classifier:
            return predicted_labels(out, self.head)
        return out[:, 0].copy() if out.shape[1] == 1 else out

    def predict_proba(self, X: Any, *, x: str | None = None) -> np.ndarray:
        """Class probabilities, rows x classes; a binary model gives [1 - p, p] (column 1 is
        ``lepton predict``'s ``probabilities``). Regressors refuse."""
        if not self.is_classifier:
            raise LeptonError(
                f"model '{self._path}' is a regression model ({self.kind}): it has no "
                "class probabilities; use predict"
            )
        out = self.outputs(X, x=x)
        if self.head == "binary":
            return np.column_stack([1.0 - out[:, 0], out[:, 0]])
        return out

    def evaluate(self, X: Any, y: Any = None, *, x: str | None = None) -> dict:
        """The metrics ``lepton evaluate`` reports for these rows (its ``--json`` ``metrics``).

        ``X`` an array and ``y`` the targets (class ids for classifiers), or ``X`` an HDF5 path
        and ``y`` (optional) its targets data set name, as ``--y``.
        """
        from ..inference import evaluate

        if y is None and not _is_path(X):
            raise LeptonError("evaluate: give the targets y with an array X")
        Xs, ys = self._rows(X, y, x=x, with_y=True)
        return evaluate(self._spec, self._params, Xs, ys, self._cpu(), SerialComm())

    def to_onnx(self, path: PathLike, *, force: bool = False, opset: int | None = None) -> Path:
        """Write this model as an ONNX graph (needs the ``onnx`` package); see ``onnx_export``.

        An existing file is replaced only with ``force``; the model file itself never is."""
        from .onnx_export import DEFAULT_OPSET, export_onnx

        return export_onnx(self, path, force=force, opset=opset or DEFAULT_OPSET)

    # ---- rows ------------------------------------------------------------------------------
    def _cpu(self):
        if self._device is None:
            from ..device import select_device

            self._device = select_device("cpu", 0, SerialComm())
        return self._device

    def _rows(self, X: Any, y: Any, *, x: str | None, with_y: bool):
        """Scaled features (and float64 targets) checked to fit the model, as the CLI has them."""
        if _is_path(X):
            if y is not None and not isinstance(y, str):
                raise LeptonError(
                    "with an HDF5 path for X, y names its targets data set (a string), "
                    f"not {type(y).__name__}"
                )
            return self._file_rows(os.fspath(X), x, y, with_y)
        if x is not None:
            raise LeptonError("x= names a data set of an HDF5 file; X is an array here")
        from ..models import check_labels, target_stats
        from ..models.io import check_features

        X = _features(X)
        check_features(self._spec, X.shape[1], f"X (shape {X.shape})", str(self._path))
        ys = _targets(y, X.shape[0]) if with_y else None
        _check_finite(X, ys)
        if ys is not None:
            check_labels(self._spec, target_stats(ys, SerialComm()), "y")
        return self._scaler.apply(X), ys

    def _file_rows(self, path: str, x: str | None, y: str | None, with_y: bool):
        from ..inference import load_rows
        from ..log import Log

        args = argparse.Namespace(model=str(self._path), data=path, x=x, y=y)
        with io.StringIO() as quiet:  # the reader's info lines are for the command line
            split = load_rows(
                self._spec, self._scaler, self._meta, args, SerialComm(), Log(0, 1, quiet), with_y
            )
        return split.X, (split.y if with_y else None)


def _frozen(a: np.ndarray) -> np.ndarray:
    out = np.array(a, copy=True)
    out.setflags(write=False)
    return out


def _is_path(X: Any) -> bool:
    return isinstance(X, str | os.PathLike)


def _features(X: Any) -> np.ndarray:
    """``X`` as the HDF5 reader hands out a features data set: 2-D (a 1-D X is one feature),
    float32 or float64 kept (native byte order), other real types as float32, 64-byte aligned."""
    from ..data.reader import _feature_dtype, aligned_empty

    a = np.asarray(X)
    if a.dtype.kind not in "fiub":
        raise DataError(f"X: dtype {a.dtype} is not a real numeric type")
    if a.ndim not in (1, 2):
        raise DataError(
            f"X must be 2-D (rows x features) or 1-D (one feature), has shape {a.shape}"
        )
    n, d = (a.shape[0], 1) if a.ndim == 1 else a.shape
    if n == 0 or d == 0:
        raise DataError(f"X is empty (shape {a.shape})")
    out = aligned_empty((n, d), _feature_dtype(a.dtype))
    out[...] = a.reshape(n, d)
    return out


def _targets(y: Any, n: int) -> np.ndarray:
    """``y`` as the reader hands out targets: float64, a column (n, 1) as (n,)."""
    if y is None:
        raise LeptonError("evaluate: give the targets y with an array X")
    a = np.asarray(y)
    if a.dtype.kind not in "fiub":
        raise DataError(f"y: dtype {a.dtype} is not a real numeric type")
    if a.ndim not in (1, 2) or a.shape[0] != n:
        raise DataError(f"y has shape {a.shape} but X has {n} rows; targets need one per row")
    if a.size == 0:
        raise DataError(f"y holds no targets (shape {a.shape})")
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(n) if a.ndim == 2 and a.shape[1] == 1 else a


def _check_finite(X: np.ndarray, y: np.ndarray | None) -> None:
    """NaN or Inf rows are refused, naming the first, as ``lepton predict`` refuses them."""
    bad = ~np.isfinite(X).all(axis=1)
    if y is not None:
        bad |= ~np.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"X/y: {int(bad.sum())} rows hold NaN or Inf (first: row {int(np.argmax(bad))})"
        )

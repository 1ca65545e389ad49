"""scikit-learn estimators over the toolkit's training: one process, or every rank of an MPI job.

``fit(X, y)`` is SPMD: under ``mpiexec -n N python script.py`` every rank calls it with its own
rows (any split, uneven, even none on a rank); the ranks train one model together, exactly as
``lepton train`` does on a file, and every rank ends with the same fitted estimator. The rows are
numbered globally by an exclusive scan of the ranks' row counts, so the fit equals one process
fitting all rows in rank order (to rounding; bit for bit with ``reproducible=True``, which moves
rows so that every rank holds whole global blocks). ``fit`` also takes the path of an HDF5 file
for ``X`` (then ``x=`` and ``y`` name its data sets, "X" and "y" by default): the ranks read
their blocks and no row passes through the script.

Class labels may be any sortable values (strings too): every rank's distinct labels are gathered,
``classes_`` is their sorted union, and the toolkit trains on their positions. ``predict``,
``predict_proba`` and ``score`` run in the calling process on the rows it passes (no MPI).

Where the run directory goes: a temporary directory that rank 0 creates and removes after the
fit, unless ``output_dir`` names one (then it is kept: results.json, metrics.jsonl, model.h5 and
checkpoints, as ``lepton train`` writes them; a lepton run directory there is replaced). Nothing
is written to the working directory.

scikit-learn is an optional dependency: ``pip install lepton_hpc[sklearn]``.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, LeptonError
from ..safety import make_scratch_dir, remove_scratch_dir

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "the lepton_hpc estimators need scikit-learn: pip install lepton_hpc[sklearn]"
    ) from exc

__all__ = [
    "LinearRegression",
    "LogisticRegression",
    "MLPClassifier",
    "MLPRegressor",
    "SoftmaxRegression",
]


NO_CHECKPOINTS = 2**62  # checkpoint.every_steps that no fit reaches (only a stop writes one)


class ParameterError(ConfigError, ValueError):
    """A constructor parameter with an impossible value (a ValueError, as scikit-learn expects)."""


# ---- the shared machinery ---------------------------------------------------------------
class _LeptonModel(BaseEstimator):
    """What every estimator shares: the config it builds, the SPMD fit, the forward pass."""

    _kind = "linear"  # model.kind; classifiers may switch (see _model_kind)

    # ---- config -----------------------------------------------------------------------
    def _sections(self, n_classes: int) -> dict[str, dict[str, Any]]:
        model: dict[str, Any] = {"kind": self._model_kind(n_classes), "l2": float(self.l2)}
        if model["kind"] == "mlp":
            model["hidden"] = [int(h) for h in self.hidden]
            model["activation"] = self.activation
            model["task"] = self._task(n_classes)
        return {
            "data": {
                "validation_fraction": float(self.validation_fraction),
                "scale": self.scale,
            },
            "model": model,
            "optim": {"name": self.optimizer, "lr": float(self.lr)},
            "train": {
                "epochs": int(self.epochs),
                "batch_size": int(self.batch_size),
                "seed": int(self.seed),
                "threads": int(self.threads),
                "patience": int(self.patience),
            },
            "comm": {"reproducible": bool(self.reproducible)},
            "output": {"plot": False},
        }

    def _model_kind(self, n_classes: int) -> str:  # noqa: ARG002 - classifiers use it
        return self._kind

    def _task(self, n_classes: int) -> str:  # noqa: ARG002 - classifiers use it
        return "regression"

    # ---- fitting ----------------------------------------------------------------------
    def _fit(self, X: Any, y: Any, *, x: str) -> _LeptonModel:
        from ..comm import world

        comm = world()
        self._reset()
        files = isinstance(X, str | Path) or (
            isinstance(X, list | tuple) and len(X) > 0 and all(isinstance(p, str | Path) for p in X)
        )
        if files:  # an HDF5 path, a glob pattern or a list of shard files
            if y is not None and not isinstance(y, str):
                raise ValueError(
                    "with an HDF5 path for X, y names its targets data set (default 'y'), "
                    f"not {type(y).__name__}"
                )
            y_name = y or "y"
            source, n_classes = None, self._file_classes(X, x, y_name, comm)
        else:
            X, y = self._check_xy(X, y, comm)
            targets, n_classes = self._encode(y, comm)
            from ..data.memory import ArraySource

            source = ArraySource(X, targets, name=f"<{type(self).__name__}.fit X>")
        sections = self._sections(n_classes)
        if source is None:
            train = str(X) if isinstance(X, str | Path) else [str(p) for p in X]
            sections["data"].update({"train": train, "x": x, "y": y_name})
        self._train(sections, source, comm)
        return self

    def _train(self, sections: dict, source: Any, comm: Any) -> None:
        from ..config import check_config, config_from_dict
        from ..engine import train
        from ..log import Log
        from ..models.io import load_model
        from .run import _guarded, _read_history, agree_typed

        stream = sys.stdout if self.verbose else io.StringIO()
        log = Log(comm.rank, comm.size, stream=stream)
        keep = self.output_dir is not None
        base = None
        if not keep:
            base = comm.bcast(_scratch_dir() if comm.is_root else None)
        run_dir = Path(self.output_dir) if keep else Path(base) / "run"
        sections["output"]["dir"] = str(run_dir)
        if not keep:  # a directory removed after the fit: its checkpoints would be pure cost
            sections["checkpoint"] = {"every_steps": NO_CHECKPOINTS}
        try:
            cfg = agree_typed(comm, lambda: self._config(sections, check_config, config_from_dict))

            def fit() -> dict:
                return train(cfg, comm, log, overwrite=keep, source=source)

            results = _guarded(comm, log, fit)

            def fitted() -> tuple | None:  # rank 0 reads what it wrote; every rank gets it
                if not comm.is_root:
                    return None
                model, params, scaler, _ = load_model(run_dir / "model.h5")
                found = (model.spec(), params, scaler.kind, scaler.shift, scaler.scale)
                return (*found, _read_history(run_dir))

            found = comm.bcast(agree_typed(comm, fitted))
            spec, params, kind, shift, scale, history = found
        finally:
            if base is not None and comm.is_root:
                remove_scratch_dir(base)  # the toolkit's own temporary directory
        self.spec_ = spec
        self.params_ = np.asarray(params, dtype=np.float64)
        self.scaler_ = (kind, np.asarray(shift), np.asarray(scale))
        self.history_ = history
        self.loss_curve_ = [float(h["loss"]) for h in history]
        self.n_iter_ = int(results["epochs"])
        self.results_ = results
        self.n_features_in_ = int(spec["sizes"][0])
        self._set_linear_attributes()

    @staticmethod
    def _config(sections, check_config, config_from_dict):
        try:
            return check_config(config_from_dict(sections))
        except ConfigError as exc:
            raise ParameterError(exc.key, str(exc).partition(": ")[2]) from None

    def _reset(self) -> None:
        for name in list(vars(self)):
            if name.endswith("_") and not name.startswith("__"):
                delattr(self, name)

    def _check_xy(self, X: Any, y: Any, comm: Any) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's input checks; under MPI every rank raises together (a ValueError
        naming the first failing rank's problem) instead of one rank leaving the others waiting
        in their next collective. A rank may pass no rows under MPI."""
        from sklearn.utils.validation import check_array, validate_data

        def check() -> tuple[np.ndarray, np.ndarray]:
            if comm.size > 1 and np.shape(X)[:1] == (0,):  # nothing here; the others have rows
                Xc = check_array(X, dtype=(np.float64, np.float32), ensure_min_samples=0)
                yc = check_array(
                    y, ensure_2d=False, ensure_min_samples=0, dtype=None, input_name="y"
                )
                self.n_features_in_ = Xc.shape[1]
                return Xc, yc.reshape(-1) if yc.ndim == 2 and yc.shape[1] == 1 else yc
            return validate_data(
                self,
                X,
                y,
                dtype=(np.float64, np.float32),
                multi_output=not self._is_classifier(),
                y_numeric=not self._is_classifier(),
            )

        if comm.size == 1:
            return check()
        return _agree_value_error(comm, check)

    def _file_classes(self, path: Any, x: str, y_name: str, comm: Any) -> int:
        """For a file, the classes are its class ids 0..k-1 (k from the largest label); rank 0
        reads the targets (one column: small next to the features) and shares what it found."""
        if not self._is_classifier():
            self._y_2d = False
            return 0
        from ..comm.base import agree

        def labels() -> int | None:
            if not comm.is_root:
                return None
            import h5py

            from ..data.reader import inspect_spec

            spec = str(path) if isinstance(path, str | Path) else [str(p) for p in path]
            info = inspect_spec(spec, x, y_name)  # a missing file or data set: one DataError
            parts = []
            for name in [s.path for s in info.shards] or [info.path]:
                with h5py.File(name, "r") as fh:
                    parts.append(np.asarray(fh[y_name][()], dtype=np.float64).ravel())
            y = np.concatenate(parts)
            finite = y[np.isfinite(y)]
            if finite.size == 0 or np.any(finite < 0) or np.any(finite != np.round(finite)):
                raise LeptonError(f"'{path}:{y_name}' must hold class ids 0, 1, ..., k-1")
            return int(finite.max()) + 1

        k = comm.bcast(agree(comm, labels))
        self.classes_ = np.arange(max(k, 2))
        return len(self.classes_)

    def _encode(self, y: np.ndarray, comm: Any) -> tuple[np.ndarray, int]:  # noqa: ARG002
        self._y_2d = y.ndim == 2
        return np.asarray(y, dtype=np.float64), 0

    def _is_classifier(self) -> bool:
        return False

    # ---- prediction -------------------------------------------------------------------
    def _outputs(self, X: Any) -> np.ndarray:
        """Model outputs (n x k, float64) for these rows, in this process."""
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "params_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        kind, shift, scale = self.scaler_
        h = np.asarray(X, dtype=np.float64)
        if kind != "none":
            h = (h - shift) / scale
        sizes = self.spec_["sizes"]
        at = 0
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            W = self.params_[at : at + a * b].reshape(a, b)
            bias = self.params_[at + a * b : at + a * b + b]
            at += a * b + b
            h = h @ W + bias
            if i < len(sizes) - 2:
                h = _ACTIVATIONS[self.spec_["activation"]](h)
        head = self.spec_["head"]
        if head == "binary":
            return _sigmoid(h)
        if head == "softmax":
            h = h - h.max(axis=1, keepdims=True)
            e = np.exp(h)
            return e / e.sum(axis=1, keepdims=True)
        return h

    def _set_linear_attributes(self) -> None:
        """coef_ and intercept_ in the units of the input features (the scaler folded in)."""
        if self.spec_["kind"] == "mlp":
            return
        d, k = self.spec_["sizes"]
        W = self.params_[: d * k].reshape(d, k)
        b = self.params_[d * k : d * k + k]
        _, shift, scale = self.scaler_
        coef = (W / scale[:, None]).T
        intercept = b - (shift / scale) @ W
        self.coef_, self.intercept_ = coef, intercept


def _scratch_dir() -> str:
    """A new private temporary directory for a throwaway run directory: in memory (/dev/shm)
    where there is one, since the run writes and syncs metrics.jsonl at every epoch; else in
    the system's temporary directory."""
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp below makes a private (0700) directory
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        try:
            return str(make_scratch_dir(shm))
        except OSError:
            pass
    return str(make_scratch_dir())


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact form, no overflow warnings


_ACTIVATIONS = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
}


class _Classifier(ClassifierMixin, _LeptonModel):
    """Labels through ``classes_``; the toolkit sees their positions 0..k-1."""

    def fit(self, X: Any, y: Any = None, *, x: str = "X") -> _Classifier:
        """Fit on this rank's rows ``X``, ``y`` (every rank calls it with its own), or on the
        HDF5 file ``X`` (a path): ``x`` and ``y`` then name its data sets ("X", "y")."""
        return self._fit(X, y, x=x)

    def _is_classifier(self) -> bool:
        return True

    def _encode(self, y: np.ndarray, comm: Any) -> tuple[np.ndarray, int]:
        from sklearn.utils.multiclass import check_classification_targets

        def local() -> np.ndarray:
            if y.size:
                check_classification_targets(y)
            return np.unique(y)

        mine = local() if comm.size == 1 else _agree_value_error(comm, local)
        gathered = [u for u in comm.allgather(mine) if u.size]
        classes = np.unique(np.concatenate(gathered)) if gathered else np.unique(y)
        if classes.size < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data, but "
                f"the data contains only one class: {classes[0] if classes.size else None!r}"
            )
        self.classes_ = classes
        if y.size == 0:  # a rank without rows (its empty y may not even compare with labels)
            return np.zeros(0), int(classes.size)
        return np.searchsorted(classes, y).astype(np.float64), int(classes.size)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n x classes), columns in the order of ``classes_``."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "params_")
        out = self._outputs(X)
        if self.spec_["head"] == "binary":
            p = out[:, 0]
            return np.column_stack([1.0 - p, p])
        return out

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row, as a label of ``classes_``."""
        proba = self.predict_proba(X)  # first: it says NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]


def _agree_value_error(comm: Any, fn):
    """``fn()`` on every rank; a ValueError or TypeError on any rank is raised as a ValueError
    on all of them together (``agree``'s rule for LeptonErrors)."""
    from ..comm.base import agree

    def run():
        try:
            return fn()
        except (ValueError, TypeError) as exc:
            raise LeptonError(str(exc)) from None

    try:
        return agree(comm, run)
    except LeptonError as exc:
        raise ValueError(str(exc)) from None


class _Regressor(RegressorMixin, _LeptonModel):
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # a 2-D y trains one model with several outputs
        return tags

    def fit(self, X: Any, y: Any = None, *, x: str = "X") -> _Regressor:
        """Fit on this rank's rows ``X``, ``y`` (every rank calls it with its own), or on the
        HDF5 file ``X`` (a path): ``x`` and ``y`` then name its data sets ("X", "y")."""
        return self._fit(X, y, x=x)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets: (n,) for one target, (n, k) for k."""
        out = self._outputs(X)
        return out[:, 0] if out.shape[1] == 1 and not self._multi else out

    def _set_linear_attributes(self) -> None:
        super()._set_linear_attributes()
        if hasattr(self, "coef_") and not self._multi:
            self.coef_, self.intercept_ = self.coef_[0], float(self.intercept_[0])

    @property
    def _multi(self) -> bool:
        """A 2-D ``y`` (or several targets in a file) gives 2-D predictions and coefficients."""
        return bool(getattr(self, "_y_2d", False)) or self.spec_["sizes"][-1] > 1


# ---- the estimators ---------------------------------------------------------------------
_COMMON = """
    Parameters mirror the config keys of ``lepton train``: ``optimizer`` (optim.name: "sgd",
    "momentum", "adam", "lbfgs"), ``lr`` (optim.lr), ``epochs`` (train.epochs; an L-BFGS
    iteration counts as one), ``batch_size`` (train.batch_size, 0 = full batch), ``l2``
    (model.l2, on weights only), ``scale`` (data.scale: "none", "zscore", "minmax"), ``seed``
    (train.seed), ``reproducible`` (comm.reproducible), ``validation_fraction``
    (data.validation_fraction), ``patience`` (train.patience, early stopping on the held-out
    rows), ``threads`` (train.threads); ``output_dir``: keep the run directory there (default:
    a temporary directory removed after the fit); ``verbose``: print the progress lines.

    Fitted attributes: ``n_features_in_``, ``n_iter_`` (epochs run), ``loss_curve_`` (training
    loss per epoch), ``history_`` (metrics.jsonl's lines), ``results_`` (results.json),
    ``params_`` (the flat parameter vector, see ``lepton_hpc.kernels``), ``spec_`` and
    ``scaler_``.

    ``check_estimator`` passes every check (run with ``epochs`` lowered to keep it quick). Only
    checks that need what an environment may lack are skipped by scikit-learn itself: the array
    API check (needs SCIPY_ARRAY_API=1) and the pandas variant of the not-an-array check (needs
    pandas). Not supported: ``sample_weight``, sparse matrices (refused with a TypeError).
"""


class _OneLayerParameters:
    """The constructor of the one-layer models (scikit-learn reads the parameters from the
    signature of ``__init__``, so it must name each one; an inherited one counts)."""

    def __init__(
        self,
        *,
        optimizer: str = "lbfgs",
        lr: float = 1.0,
        epochs: int = 100,
        batch_size: int = 0,
        l2: float = 0.0,
        scale: str = "none",
        seed: int = 42,
        reproducible: bool = False,
        validation_fraction: float = 0.0,
        patience: int = 0,
        threads: int = 0,
        output_dir: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.l2 = l2
        self.scale = scale
        self.seed = seed
        self.reproducible = reproducible
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.threads = threads
        self.output_dir = output_dir
        self.verbose = verbose


class LinearRegression(_OneLayerParameters, _Regressor):
    __doc__ = (
        """Least-squares linear regression (model.kind = "linear"), trained by the toolkit.

    Fitted ``coef_`` (features,) and ``intercept_`` (a float), or (targets, features) and
    (targets,) for a 2-D ``y``, in the units of the input features.
"""
        + _COMMON
    )

    _kind = "linear"


class LogisticRegression(_OneLayerParameters, _Classifier):
    __doc__ = (
        """Logistic regression: binary (model.kind = "logistic") for two classes, multinomial
    (a softmax model, as scikit-learn's) for more.

    Fitted ``classes_``, ``coef_`` (1, features) or (classes, features) and ``intercept_``, in
    the units of the input features.
"""
        + _COMMON
    )

    _kind = "logistic"

    def _model_kind(self, n_classes: int) -> str:
        return "logistic" if n_classes <= 2 else "softmax"


class SoftmaxRegression(LogisticRegression):
    __doc__ = (
        """Multinomial logistic regression (model.kind = "softmax"), for two classes too.

    Fitted ``classes_``, ``coef_`` (classes, features) and ``intercept_`` (classes,), in the
    units of the input features.
"""
        + _COMMON
    )

    _kind = "softmax"

    def _model_kind(self, n_classes: int) -> str:  # noqa: ARG002
        return "softmax"


class _MLPParameters:
    """The constructor of the MLP estimators (scikit-learn reads the parameters from the
    signature of ``__init__``; an inherited one counts)."""

    def __init__(
        self,
        *,
        hidden: tuple[int, ...] = (32,),
        activation: str = "relu",
        optimizer: str = "adam",
        lr: float = 0.01,
        epochs: int = 100,
        batch_size: int = 200,
        l2: float = 0.0,
        scale: str = "none",
        seed: int = 42,
        reproducible: bool = False,
        validation_fraction: float = 0.0,
        patience: int = 0,
        threads: int = 0,
        output_dir: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden = hidden
        self.activation = activation
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.l2 = l2
        self.scale = scale
        self.seed = seed
        self.reproducible = reproducible
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.threads = threads
        self.output_dir = output_dir
        self.verbose = verbose


class MLPClassifier(_MLPParameters, _Classifier):
    __doc__ = (
        """A multi-layer perceptron classifier (model.kind = "mlp", a binary or softmax head).

    ``hidden``: the hidden layer widths; ``activation``: "relu", "tanh" or "sigmoid". Fitted
    ``classes_``.
"""
        + _COMMON
    )

    _kind = "mlp"

    def _model_kind(self, n_classes: int) -> str:  # noqa: ARG002
        return "mlp"

    def _task(self, n_classes: int) -> str:
        return "binary" if n_classes <= 2 else "multiclass"


class MLPRegressor(_MLPParameters, _Regressor):
    __doc__ = (
        """A multi-layer perceptron regressor (model.kind = "mlp", squared-error head).

    ``hidden``: the hidden layer widths; ``activation``: "relu", "tanh" or "sigmoid".
"""
        + _COMMON
    )

    _kind = "mlp"

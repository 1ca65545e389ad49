"""Models as a layout over one flat float64 parameter vector.

Every model is a stack of dense layers (``sizes``) with a head; linear and logistic regression
are the one-layer cases. The math is in ``lepton_hpc.kernels``; this layer chooses shapes,
initialises parameters, checks targets and (de)serialises the model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..comm.base import Communicator
from ..errors import DataError

KIND_HEADS = {"linear": "squared", "logistic": "binary", "softmax": "softmax"}
TASK_HEADS = {"regression": "squared", "binary": "binary", "multiclass": "softmax"}


@dataclass(frozen=True, slots=True)
class Model:
    """Layer widths, hidden activation and head; parameters live outside, in one flat buffer."""

    kind: str
    sizes: tuple[int, ...]
    activation: str = "relu"
    head: str = "squared"
    codes: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        codes = (kernels.ACTIVATIONS[self.activation], kernels.HEADS[self.head])
        object.__setattr__(self, "codes", codes)

    @property
    def n_features(self) -> int:
        return self.sizes[0]

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    @property
    def n_params(self) -> int:
        return kernels.param_count(self.sizes)

    @property
    def is_classifier(self) -> bool:
        return self.head != "squared"

    @property
    def n_classes(self) -> int:
        return 2 if self.head == "binary" else self.n_outputs

    def layers(self) -> list[tuple[slice, slice, int, int]]:
        """(weight slice, bias slice, fan_in, fan_out) of each layer in the flat buffer."""
        out, at = [], 0
        for a, b in itertools.pairwise(self.sizes):
            out.append((slice(at, at + a * b), slice(at + a * b, at + a * b + b), a, b))
            at += a * b + b
        return out

    def weight_mask(self) -> np.ndarray:
        """True where the flat buffer holds a weight (L2 applies), False for biases."""
        mask = np.zeros(self.n_params, dtype=bool)
        for w, _, _, _ in self.layers():
            mask[w] = True
        return mask

    def init_params(self, scheme: str, seed: int) -> np.ndarray:
        """A fresh parameter vector; weights drawn per layer from a stream keyed by the seed."""
        if scheme == "auto":
            scheme = (
                "zeros" if self.kind != "mlp" else ("he" if self.activation == "relu" else "xavier")
            )
        params = np.zeros(self.n_params)
        for i, (w, _, fan_in, fan_out) in enumerate(self.layers()):
            rng = np.random.default_rng([seed, 0x1A7E, i])
            shape = (fan_in * fan_out,)
            if scheme == "uniform":
                bound = 1.0 / np.sqrt(fan_in)
                params[w] = rng.uniform(-bound, bound, shape)
            elif scheme == "xavier":
                bound = np.sqrt(6.0 / (fan_in + fan_out))
                params[w] = rng.uniform(-bound, bound, shape)
            elif scheme == "he":
                params[w] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
            elif scheme != "zeros":
                raise ValueError(scheme)
        return params

    def spec(self) -> dict:
        return {
            "kind": self.kind,
            "sizes": list(self.sizes),
            "activation": self.activation,
            "head": self.head,
        }


def target_stats(y: np.ndarray, comm: Communicator) -> tuple[float, float, bool]:
    """Global (min, max, all-integer) of the targets."""
    lo = np.array([y.min() if y.size else np.inf])
    hi = np.array([y.max() if y.size else -np.inf])
    flat = y.reshape(-1)
    step = 1 << 16  # a piece at a time: no temporaries the size of the targets
    fractional = any(
        np.any(flat[a : a + step] != np.round(flat[a : a + step]))
        for a in range(0, flat.size, step)
    )
    nonint = np.array([int(fractional)], dtype=np.int64)
    comm.allreduce_min_(lo)
    comm.allreduce_max_(hi)
    comm.allreduce_(nonint)
    return float(lo[0]), float(hi[0]), bool(nonint[0] == 0)


def check_labels(model: Model, stats: tuple[float, float, bool], where: str) -> None:
    """Class ids must be integers in 0..k-1 for a classifier; name the offending value."""
    if not model.is_classifier:
        return
    lo, hi, integer = stats
    k = model.n_classes
    if not integer or lo < 0 or hi > k - 1:
        bad = lo if lo < 0 else hi
        kind = "non-integer labels" if not integer else f"label {bad:g}"
        raise DataError(f"{where} holds {kind} outside the classes 0..{k - 1} of this model")


def build_model(
    cfg, n_features: int, y_dim: int, stats: tuple[float, float, bool], where: str
) -> Model:
    """The model a ``ModelConfig`` asks for, shaped by the data (features, classes, outputs)."""
    lo, hi, integer = stats
    if cfg.kind == "mlp":
        task = cfg.task
        if task == "auto":
            binary = integer and lo >= 0 and hi <= 1
            task = "binary" if binary else ("multiclass" if integer and lo >= 0 else "regression")
        head = TASK_HEADS[task]
    else:
        head = KIND_HEADS[cfg.kind]
    if head == "softmax":
        if not integer or lo < 0:
            raise DataError(f"{where} must hold class ids 0..k-1 for a multi-class model")
        if hi + 1 > cfg.max_classes:
            raise DataError(
                f"{where} holds label {hi:.0f}: a multi-class model would have {hi + 1:.0f} "
                f"classes, more than model.max_classes = {cfg.max_classes} (raise it if meant)"
            )
        k = max(int(hi) + 1, 2)
    elif head == "squared":
        k = y_dim
    else:
        k = 1
    sizes = (n_features, *(cfg.hidden if cfg.kind == "mlp" else ()), k)
    model = Model(cfg.kind, tuple(int(s) for s in sizes), cfg.activation, head)
    check_labels(model, stats, where)
    return model

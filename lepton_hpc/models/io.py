"""``model.h5``: parameters, model spec, scaler and metadata, versioned and validated on load.

Layout (format 1):
    /params            float64 (P,)    the flat parameter vector (layout: lepton_hpc.kernels)
    /scaler/shift      float64 (d,)    x' = (x - shift) / scale
    /scaler/scale      float64 (d,)
    attrs: format_version=1, kind, sizes (int64), activation, head, scaler ("none"|"zscore"|
           "minmax"), x, y (data set names it was trained on), lepton_version, meta (JSON)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..data.preprocess import Scaler
from ..errors import DataError, LeptonError
from . import Model

FORMAT_VERSION = 1


def save_model(path: Path, model: Model, params: np.ndarray, scaler: Scaler, meta: dict) -> None:
    """Write ``model.h5`` atomically (temporary file, fsync, rename)."""
    from .. import __version__

    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as fh:
        fh.create_dataset("params", data=params)
        fh.create_dataset("scaler/shift", data=scaler.shift)
        fh.create_dataset("scaler/scale", data=scaler.scale)
        fh.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "kind": model.kind,
                "sizes": np.asarray(model.sizes, dtype=np.int64),
                "activation": model.activation,
                "head": model.head,
                "scaler": scaler.kind,
                "lepton_version": __version__,
                "meta": json.dumps(meta, default=str),
            }
        )
    with tmp.open("rb+") as raw:
        os.fsync(raw.fileno())
    tmp.replace(path)


def load_model(path: str | Path) -> tuple[Model, np.ndarray, Scaler, dict]:
    """Read and check a ``model.h5``; every problem names the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise LeptonError(f"model file '{p}' does not exist")
    try:
        with h5py.File(p, "r") as fh:
            version = int(fh.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise DataError(
                    f"'{p}' is not a lepton model (format_version {version}, "
                    f"expected {FORMAT_VERSION})"
                )
            sizes = tuple(int(s) for s in fh.attrs["sizes"])
            model = Model(
                str(fh.attrs["kind"]), sizes, str(fh.attrs["activation"]), str(fh.attrs["head"])
            )
            params = fh["params"][()]
            scaler = Scaler(str(fh.attrs["scaler"]), fh["scaler/shift"][()], fh["scaler/scale"][()])
            meta = json.loads(fh.attrs["meta"])
    except (OSError, KeyError) as exc:
        raise DataError(f"'{p}' is not a readable lepton model ({exc})") from None
    if params.shape != (model.n_params,) or scaler.shift.shape != (model.n_features,):
        raise DataError(f"'{p}' is damaged: {params.size} parameters for sizes {sizes}")
    return model, params, scaler, meta


def check_features(model: Model, n_features: int, where: str, model_path: str) -> None:
    """A model trained on d features refuses data with another count, naming both."""
    if n_features != model.n_features:
        raise DataError(
            f"{where} has {n_features} features but the model '{model_path}' was "
            f"trained on {model.n_features}"
        )

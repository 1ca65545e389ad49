"""``model.h5``: parameters, model spec, scaler and metadata, versioned, checksummed, validated.

Layout (format 2):
    /params            float64 (P,)    the flat parameter vector (layout: lepton_hpc.kernels)
    /scaler/shift      float64 (d,)    x' = (x - shift) / scale
    /scaler/scale      float64 (d,)
    attrs: format_version=2, kind, sizes (int64), activation, head, scaler ("none"|"zscore"|
           "minmax"), lepton_version, meta (JSON: config, model spec, data fingerprint,
           optimiser), sha256
``sha256`` is ``checkpoint.digest`` over every data set and every other attribute, so a model
whose parameters, scaler or attributes were altered or damaged is refused on load. Format 1 (the
same without ``sha256``) still loads; its meta then holds ``"unverified": "format 1: no
checksum"`` so that a caller can say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..checkpoint import digest
from ..data.preprocess import Scaler
from ..errors import DataError, LeptonError
from ..safety import atomic_file
from . import Model

FORMAT_VERSION = 2
READABLE = (1, 2)  # format 1: no checksum


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as a JSON value (arrays as lists, NumPy scalars as Python ones)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def save_model(path: Path, model: Model, params: np.ndarray, scaler: Scaler, meta: dict) -> None:
    """Write ``model.h5`` atomically (temporary file, fsync, rename), with its checksum."""
    from .. import __version__

    arrays = {
        "params": np.asarray(params),
        "scaler/shift": np.asarray(scaler.shift),
        "scaler/scale": np.asarray(scaler.scale),
    }
    attrs = {
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "sizes": np.asarray(model.sizes, dtype=np.int64),
        "activation": model.activation,
        "head": model.head,
        "scaler": scaler.kind,
        "lepton_version": __version__,
        "meta": json.dumps(meta, default=str),
    }
    with atomic_file(Path(path)) as tmp, h5py.File(tmp, "w") as fh:
        for name, a in arrays.items():
            fh.create_dataset(name, data=a)
        fh.attrs.update(attrs)
        fh.attrs["sha256"] = digest(arrays, {k: _plain(v) for k, v in attrs.items()})


def load_model(path: str | Path) -> tuple[Model, np.ndarray, Scaler, dict]:
    """Read and check a ``model.h5``; every problem names the file and what is wrong.

    A format-2 file must pass its checksum (``DataError`` "fails its checksum" otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise LeptonError(f"model file '{p}' does not exist")
    try:
        with h5py.File(p, "r") as fh:
            version = _plain(fh.attrs.get("format_version", -1))
            if version not in READABLE:
                if isinstance(version, int) and version > FORMAT_VERSION:
                    raise DataError(
                        f"model file '{p}' has format_version {version}, newer than this "
                        f"lepton reads ({FORMAT_VERSION}): use a newer lepton"
                    )
                raise DataError(
                    f"'{p}' is not a lepton model (format_version {version}, "
                    f"expected {FORMAT_VERSION})"
                )
            arrays: dict[str, np.ndarray] = {}
            fh.visititems(
                lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
            attrs = {k: _plain(v) for k, v in fh.attrs.items() if k != "sha256"}
            stored = _plain(fh.attrs.get("sha256"))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"'{p}' is not a readable lepton model ({exc})") from None
    if version >= 2 and stored != digest(arrays, attrs):
        raise DataError(f"model file '{p}' fails its checksum (damaged or altered)")
    try:
        sizes = tuple(int(s) for s in attrs["sizes"])
        model = Model(str(attrs["kind"]), sizes, str(attrs["activation"]), str(attrs["head"]))
        params = arrays["params"]
        scaler = Scaler(str(attrs["scaler"]), arrays["scaler/shift"], arrays["scaler/scale"])
        meta = json.loads(attrs["meta"])
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"'{p}' is not a readable lepton model ({exc})") from None
    if params.shape != (model.n_params,) or scaler.shift.shape != (model.n_features,):
        raise DataError(f"'{p}' is damaged: {params.size} parameters for sizes {sizes}")
    if version == 1 and isinstance(meta, dict):
        meta["unverified"] = "format 1: no checksum"
    return model, params, scaler, meta


def check_features(model: Model, n_features: int, where: str, model_path: str) -> None:
    """A model trained on d features refuses data with another count, naming both."""
    if n_features != model.n_features:
        raise DataError(
            f"{where} has {n_features} features but the model '{model_path}' was "
            f"trained on {model.n_features}"
        )

"""Inference: model outputs, exact metrics, and predictions written to HDF5.

``forward`` and ``evaluate`` are shared by training (validation and test metrics), ``lepton
evaluate`` and ``lepton predict``. ``load_for_inference`` reads a trained model and a data set
and checks that they fit each other; ``predict_one`` writes the predictions of one file. The CLI
(``commands``) and batch prediction (``batch_predict``) call these; nothing here parses arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from .comm.base import Communicator, agree
from .device import Device
from .exact import ExactSums
from .log import Log
from .metric_kernels import binary_model_sums
from .metrics import MetricSums, target_mean
from .models import Model

CHUNK_ROWS = 65_536  # bounds the output buffer of a forward pass
EVAL_ROWS = 4 * CHUNK_ROWS  # rows whose outputs and metric terms exist at once


def forward(model: Model, params: np.ndarray, X, device: Device) -> np.ndarray:
    """Model outputs (n x k, float64) for the rows of ``X``, computed in chunks."""
    n = X.shape[0]
    out = np.empty((n, model.n_outputs), dtype=np.float64)
    sizes = np.asarray(model.sizes, dtype=np.int64)
    act, head = model.codes
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        device.kernels.forward(X[lo:hi], params, sizes, act, head, out[lo:hi])
    return out


def add_outputs(metrics: MetricSums, model: Model, params, X, y, device: Device) -> None:
    """``metrics.add(y, forward(model, params, X, device))``; for a logistic model with up to
    32 features on the tuned CPU kernels, in one fused pass that never stores the outputs
    (``metric_kernels.binary_model_sums``: the same bits)."""
    from .kernels import cpu, native
    from .kernels.checks import check_model

    fused = (
        model.head == "binary"
        and len(model.sizes) == 2
        and device.kernels is cpu
        and cpu.USE_TILES
        and native.supported()[0]
        and model.sizes[0] <= cpu.TILE_WIDTH
        and X.shape[0] > 0
    )
    if not fused:
        metrics.add(y, forward(model, params, X, device))
        return
    sizes = np.asarray(model.sizes, dtype=np.int64)
    X, params, sizes = check_model(X, params, sizes, *model.codes)
    ahead = max(1, cpu.TILE_AHEAD_BYTES // (X.shape[1] * X.itemsize))
    labels = np.ascontiguousarray(y, dtype=np.float64).reshape(-1)
    threads = numba.get_num_threads()
    binary_model_sums(X, labels, params, ahead, metrics.cm, metrics.sums.bins[0], threads)


def evaluate(
    model: Model,
    params: np.ndarray | None,
    X,
    y: np.ndarray,
    device: Device,
    comm: Communicator,
    outputs: Callable[[Any], np.ndarray] | None = None,
) -> dict:
    """Exact global metrics of ``params`` on every rank's rows (all ranks get the same dict).

    The outputs and their per-row terms are made ``EVAL_ROWS`` rows at a time and summed into
    integer counts and exact sums (``MetricSums``): the bits of one whole-array computation,
    without its float64 temporaries of the whole block (several times the rows of narrow data).
    ``outputs``: computes the model's outputs of some rows instead of ``forward`` with
    ``params`` (tensor parallelism: from this rank's slice, with its tensor group).
    """
    y_mean = None
    if model.head == "squared":  # R² needs the global mean of each target column first
        cols = y if y.ndim == 2 else y[:, None]  # (n, outputs), also for a rank without rows
        sums = ExactSums(cols.shape[1])
        sums.add(list(cols.T))
        n = int(comm.allreduce_(np.array([cols.shape[0]], dtype=np.int64))[0])
        y_mean = target_mean(sums, n, comm)
    metrics = MetricSums(model.head, model.n_classes, y_mean)
    for lo in range(0, X.shape[0], EVAL_ROWS):
        hi = min(X.shape[0], lo + EVAL_ROWS)
        rows = X[lo:hi]
        if outputs is None:
            add_outputs(metrics, model, params, rows, y[lo:hi], device)
        else:
            metrics.add(y[lo:hi], outputs(rows))
    return metrics.result(comm)


def load_for_inference(args, comm: Communicator, log: Log, with_y: bool):
    """The model of ``args.model`` and this rank's rows of ``args.data``, checked to fit.

    ``args`` has ``model``, ``data``, ``x`` and ``y`` (None: the data set names the model was
    trained with). Returns (model, params, split, device); every rank fails together on a
    mismatch (feature count, labels the model does not know).
    """
    from .device import select_device
    from .models.io import load_model

    model, params, scaler, meta = agree(comm, lambda: load_model(args.model))
    if meta.get("unverified"):
        log.warning(f"model file '{args.model}' is unverified ({meta['unverified']})")
    split = load_rows(model, scaler, meta, args, comm, log, with_y)
    device = agree(comm, lambda: select_device("cpu", 0, comm))
    return model, params, split, device


def load_rows(model: Model, scaler, meta: dict, args, comm: Communicator, log: Log, with_y: bool):
    """This rank's rows of ``args.data`` scaled for a model already read, checked to fit it.

    Shared by the command line and the in-process ``lepton_hpc.api.model``, so that both read,
    scale and check a file the same way and their numbers agree bit for bit.
    """
    from .data.dataset import load_eval_data
    from .models import check_labels, target_stats
    from .models.io import check_features

    cfg = meta.get("config", {}).get("data", {})
    x = args.x or cfg.get("x", "X")
    y = (args.y or cfg.get("y", "y")) if with_y else None
    split, info = load_eval_data(args.data, x, y, scaler, comm, log)
    agree(comm, lambda: check_features(model, info.n_features, f"'{info.path}:{x}'", args.model))
    if with_y:
        stats = target_stats(split.y, comm)
        agree(comm, lambda: check_labels(model, stats, f"'{info.path}:{y}'"))
    return split


def predict_one(
    model_path: str,
    data_path,
    out_path: str,
    comm: Communicator,
    log: Log,
    force: bool,
    *,
    x: str | None = None,
) -> str:
    """Predict every row of one file on the ranks of ``comm`` into ``out_path``.

    ``data_path``: a file, or shards (a glob pattern or a list of files) predicted as the one
    file holding their rows in order; no output may be any of them."""
    from .data.shards import input_roles, is_multi, resolve
    from .safety import check_not_input

    def plan() -> dict[str, str]:
        if not comm.is_root:
            return {}
        paths = resolve(data_path, "--data") if is_multi(data_path) else [data_path]
        found = {**input_roles("data", paths), "model": model_path}
        check_not_input(out_path, found, "--out")
        return found

    # before any work, and again (with the existence check) when the file is created
    inputs = comm.bcast(agree(comm, plan))
    args = argparse.Namespace(model=model_path, data=data_path, x=x, y=None)
    model, params, split, device = load_for_inference(args, comm, log, with_y=False)
    out = forward(model, params, split.X, device)
    start = int(split.ids[0]) if split.ids is not None and split.n else split.start
    name = write_predictions(out_path, model, out, start, split.n_global, comm, force, inputs)
    labels = " and labels" if model.is_classifier else ""
    log.info(f"wrote {out_path}: {split.n_global} rows ({name}{labels})")
    return out_path


def write_predictions(
    out_path: str,
    model: Model,
    out: np.ndarray,
    start: int,
    n: int,
    comm: Communicator,
    force: bool,
    inputs: dict[str, str],
) -> str:
    """Write this rank's rows of ``out`` (from global row ``start``) into a new HDF5 file of
    ``n`` rows, in parallel; classifiers also get their predicted labels. Returns the data set
    name (``probabilities`` or ``predictions``)."""
    from .data.h5 import create_parallel, write_rows
    from .data.shards import label
    from .metrics import predicted_labels

    nbytes = n * model.n_outputs * 8 + (n * 8 if model.is_classifier else 0)
    with create_parallel(out_path, comm, force=force, inputs=inputs, nbytes=nbytes) as fh:
        name = "probabilities" if model.is_classifier else "predictions"
        dset = fh.create_dataset(name, shape=(n, model.n_outputs), dtype=np.float64)
        write_rows(dset, start, out, comm)
        if model.is_classifier:
            labels = fh.create_dataset("labels", shape=(n,), dtype=np.int64)
            write_rows(labels, start, predicted_labels(out, model.head), comm)
        data = inputs.get("data") or label([v for k, v in inputs.items() if k.startswith("data[")])
        attrs = {"model": str(inputs["model"]), "data": str(data), "head": model.head}
        fh.attrs.update(attrs)
    return name

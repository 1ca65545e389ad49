"""``lepton warmup``: compile every Numba kernel a run uses now, so the first real run does not.

The kernels are ``@njit(cache=True)``: each signature is compiled once and then loaded from
Numba's on-disk cache (``__pycache__`` beside the sources, or ``NUMBA_CACHE_DIR``). A fresh
install has an empty cache, so the first ``lepton train`` used to spend its first epoch
compiling. ``make install`` runs this command once, so that cost is paid at install time.

Why whole tiny runs instead of calling the kernels directly: a Numba signature is the exact
tuple of argument types (dtype, dimensions, layout, read-only flag), and the data readers, the
batch gather and the exact metrics have jitted kernels of their own. Training real (tiny) jobs
through ``engine.train`` and ``lepton predict`` reaches every one of them with the types a real
run passes, and stays right when those paths change. The matrix covers: float32 and float64
data; linear, logistic, softmax and MLP models (every activation); full-batch L-BFGS and
mini-batches; one and several threads (serial and parallel batch gathers, the optimisers'
updates of small and large models); one-output models for each register-tile and
feature-panel kernel (feature counts 6, 12, 20, 30, 40), the same panels on mini-batch rows
read in place, and the float32-product kernel (40 features, ``train.products = "float32"``);
tensor parallelism's sliced kernels (one rank, ``comm.tensor_ranks = 1``); streamed full-batch
runs on rows mapped from the file (read-only arrays); evaluation on a test file; predict; the
chunk decoders of the reader (a small chunked file of each layout it decodes with Numba code,
read as a run reads it).
Activations and heads are run-time codes, not types, so they share compiled code; they are run
anyway because it costs milliseconds once compiled.

Where the tuned native kernels are not supported (``kernels.native.supported()``), the same runs
compile the reference kernels the CPU backend falls back to there.

Compiled code is keyed by Numba on the CPU name and features: a cache written on one node type
is not used on a node with another CPU (that node compiles and caches its own, once).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from .comm.base import Communicator
from .errors import LeptonError
from .log import Log

ROWS = 1100  # tiny, but room for one batch of 1,024 (the parallel batch gather)
# One-output models with AVX-512: register tiles of one, two and four registers a row (<= 8, <= 16
# features, and the squared head's 29-32), 4-feature panels (17-40) and 8-feature panels (wider);
# AVX2 runs panels for all.
NARROW, MID, PANEL, TILED, WIDE = 6, 12, 20, 30, 48
CLASSES = 3
TASKS = (  # the data files (task, features)
    ("binary", NARROW),
    ("binary_mid", MID),
    ("binary_panel", PANEL),
    ("binary_tiled", TILED),
    ("binary_wide", WIDE),
    ("linear", NARROW),
    ("linear_tiled", TILED),
    ("blobs", 5),
)


def _datasets(folder: Path, dtype: np.dtype) -> dict[str, Path]:
    """Small HDF5 files of X (``dtype``) and float64 y for regression, binary and classes."""
    import h5py

    rng = np.random.default_rng(0)
    files = {}
    for task, d in TASKS:
        X = rng.standard_normal((ROWS, d)).astype(dtype)
        if task.startswith("linear"):
            y = X.astype(np.float64) @ np.linspace(-1.0, 1.0, d) + 0.1 * rng.standard_normal(ROWS)
        elif task == "blobs":
            y = (np.arange(ROWS) % CLASSES).astype(np.float64)
            X[:, 0] += y.astype(dtype)
        else:
            y = (X[:, 0] > 0).astype(np.float64)
        path = folder / f"{task}_{np.dtype(dtype).name}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("X", data=X)
            fh.create_dataset("y", data=y)
        files[task] = path
    return files


def _jobs(files: dict[str, Path]) -> list[dict]:
    """(model, optim, train) sections of the warm-up runs on one dtype's files."""
    mini = {"epochs": 1, "batch_size": 32}
    big = {"epochs": 1, "batch_size": 1024}  # with 2 threads: the parallel batch gather
    f32 = {"products": "float32"}
    jobs = [
        ("linear", {"kind": "linear"}, {"name": "sgd", "lr": 0.01}, mini),
        ("linear", {"kind": "linear"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("binary", {"kind": "logistic"}, {"name": "adam"}, mini),
        ("binary", {"kind": "logistic"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("binary_mid", {"kind": "logistic"}, {"name": "adam"}, mini),
        ("binary_mid", {"kind": "logistic"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("binary_panel", {"kind": "logistic"}, {"name": "adam"}, mini),
        ("binary_panel", {"kind": "logistic"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("binary_tiled", {"kind": "logistic"}, {"name": "adam"}, mini),
        ("binary_tiled", {"kind": "logistic"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("linear_tiled", {"kind": "linear"}, {"name": "sgd", "lr": 0.01}, mini),
        ("linear_tiled", {"kind": "linear"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("binary_wide", {"kind": "logistic"}, {"name": "momentum"}, mini),
        ("binary_wide", {"kind": "logistic"}, {"name": "lbfgs"}, {"epochs": 2}),
        # train.products = "float32": one-output rows wider than the tiles (float32 data)
        ("binary_wide", {"kind": "logistic"}, {"name": "lbfgs"}, {"epochs": 2, **f32}),
        ("binary_wide", {"kind": "logistic"}, {"name": "adam"}, {**mini, **f32}),
        ("blobs", {"kind": "softmax"}, {"name": "adam"}, mini),
        ("blobs", {"kind": "softmax"}, {"name": "lbfgs"}, {"epochs": 2}),
        ("linear", {"kind": "linear"}, {"name": "adam"}, {**mini, "threads": 1}),
        # a model whose batches are copied (one-output models read theirs in place on AVX2)
        ("blobs", {"kind": "softmax"}, {"name": "adam"}, {**big, "threads": 2}),
        ("binary", {"kind": "logistic"}, {"name": "adam"}, {**big, "threads": 2}),
    ]
    # 40 hidden units: over 256 parameters, so the gradient sums take the tiled combine
    jobs += [
        ("binary", {"kind": "mlp", "hidden": [40], "activation": act}, {}, mini)
        for act in ("relu", "tanh", "sigmoid")
    ]
    jobs.append(("blobs", {"kind": "mlp", "hidden": [5, 3]}, {}, {"epochs": 1}))  # full batch
    # 64 hidden units and more: the layers run as BLAS GEMMs over row blocks (kernels.cpu_gemm)
    jobs.append(("binary", {"kind": "mlp", "hidden": [64]}, {}, mini))
    jobs.append(("binary", {"kind": "mlp", "hidden": [64]}, {}, {**mini, **f32}))
    jobs.append(("blobs", {"kind": "mlp", "hidden": [64, 3]}, {}, {"epochs": 1}))
    # 34,819 parameters: the optimisers' updates run on the rank's threads (optim.updates)
    jobs += [
        ("blobs", {"kind": "mlp", "hidden": [256, 128]}, optim, {**mini, "max_steps": 2})
        for optim in ({"name": "sgd", "lr": 0.01}, {"name": "momentum"}, {"name": "adam"})
    ]
    jobs.append(("linear", {"kind": "mlp", "hidden": [4]}, {}, {**mini, "threads": 1}))
    # model.parallel = "tensor" on one rank (k = 1): the sliced kernels, with the types of any k
    jobs.append(("blobs", {"kind": "mlp", "hidden": [6, 4], "parallel": "tensor"}, {}, mini))
    runs = [
        {
            "data": {"train": str(files[task]), "test": str(files[task]), "scale": "zscore"},
            "model": model,
            "optim": optim,
            "train": {"seed": 1, **train},
            "checkpoint": {"every_steps": 0, "keep": 1},
            "output": {"plot": False},
        }
        for task, model, optim, train in jobs
    ]
    # data.stream with rows used as stored: the kernels read rows mapped from the file, whose
    # arrays are read-only (a type of their own to Numba)
    streamed = [
        ("linear", {"kind": "linear"}),
        ("binary", {"kind": "logistic"}),
        ("binary_mid", {"kind": "logistic"}),
        ("binary_panel", {"kind": "logistic"}),
        ("binary_tiled", {"kind": "logistic"}),
        ("linear_tiled", {"kind": "linear"}),
        ("binary_wide", {"kind": "logistic"}),
        ("blobs", {"kind": "softmax"}),
        ("blobs", {"kind": "mlp", "hidden": [5, 3]}),
        ("blobs", {"kind": "mlp", "hidden": [64]}),
        ("binary_wide", {"kind": "logistic"}, f32),
    ]
    runs += [
        {
            "data": {"train": str(files[task]), "stream": True},
            "model": model,
            # L-BFGS is for the convex models; an MLP's full-batch pass runs under Adam
            "optim": {"name": "adam" if model["kind"] == "mlp" else "lbfgs"},
            "train": {"seed": 1, "epochs": 2, "batch_size": 0, **(more[0] if more else {})},
            "checkpoint": {"every_steps": 0, "keep": 1},
            "output": {"plot": False},
        }
        for task, model, *more in streamed
    ]
    return runs


def warm(
    comm: Communicator,
    folder: Path,
    dtypes: tuple = (np.float32, np.float64),
    kinds: tuple[str, ...] = ("linear", "logistic", "softmax", "mlp"),
) -> int:
    """Run the warm-up jobs in ``folder`` (a scratch directory); returns how many ran.

    ``dtypes``/``kinds``: a subset (tests warm one kind in seconds instead of all in minutes)."""
    from .config import check_config, config_from_dict
    from .engine import train
    from .inference import predict_one

    quiet = Log(comm.rank, comm.size, stream=io.StringIO())
    n = 0
    for dtype in dtypes:
        files = _datasets(folder, np.dtype(dtype))
        for sections in _jobs(files):
            if sections["model"]["kind"] not in kinds:
                continue
            run = folder / f"run{n}"
            sections["output"]["dir"] = str(run)
            train(check_config(config_from_dict(sections)), comm, quiet, overwrite=True)
            predict_one(
                str(run / "model.h5"),
                sections["data"]["train"],
                str(folder / f"p{n}.h5"),
                comm,
                quiet,
                False,
                x="X",
            )
            n += 1
    return n


def warm_decoders(comm: Communicator, folder: Path) -> int:
    """Read a small chunked file of each layout the reader decodes itself with Numba code
    (unfiltered, gzip + shuffle + fletcher32, lzf + shuffle, and with hdf5plugin LZ4, zstd and
    bitshuffle), whole chunks and a partial one, as ``reader.read_block`` does in a run; returns
    how many."""
    import h5py

    from .data import reader

    quiet = Log(comm.rank, comm.size, stream=io.StringIO())
    rng = np.random.default_rng(0)
    X = np.round(rng.normal(size=(100, 4)), 2).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.float64)
    pipelines: list[dict] = [
        {},
        {"compression": "gzip", "shuffle": True, "fletcher32": True},
        {"compression": "lzf", "shuffle": True},
    ]
    try:
        import hdf5plugin
    except ImportError:
        hdf5plugin = None
    if hdf5plugin is not None:
        pipelines += [
            {**hdf5plugin.LZ4(), "shuffle": True},
            {**hdf5plugin.Zstd(), "shuffle": True},
            dict(hdf5plugin.Bitshuffle(cname="lz4")),
            dict(hdf5plugin.Bitshuffle(cname="none")),
        ]
    for i, kw in enumerate(pipelines):
        path = folder / f"layout{i}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("X", data=X, chunks=(32, 4), **kw)  # a partial last chunk
            fh.create_dataset("y", data=y, chunks=(32,), **kw)
        reader.read_block(str(path), "X", "y", comm, quiet)
    return len(pipelines)


def register_warmup(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="compile and cache the Numba kernels now (make install runs it), so that the "
        "first run does not spend its first epoch compiling",
    )
    p.set_defaults(func=run_warmup)


def run_warmup(args: argparse.Namespace, comm: Communicator, log: Log) -> int:  # noqa: ARG001
    from .compile_clock import compile_clock
    from .kernels import fastmath, native

    if comm.size > 1:
        raise LeptonError(f"lepton warmup runs as one process, not {comm.size} ranks")
    clock = compile_clock()
    c0, t0 = clock.seconds, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lepton-warmup-") as tmp:
        n = warm(comm, Path(tmp))
        n += warm_decoders(comm, Path(tmp))
    where = Path(fastmath.fast_exp.stats.cache_path).parent  # where Numba chose: beside
    # the sources (their __pycache__), NUMBA_CACHE_DIR, or a user cache
    kind = "tuned" if native.supported()[0] else "reference"
    log.info(
        f"lepton warmup: {n} tiny runs in {time.perf_counter() - t0:.1f} s, "
        f"{clock.seconds - c0:.1f} s of it compiling {kind} kernels, cached under {where}"
    )
    return 0

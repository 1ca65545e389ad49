"""Set-up of a training run: configuration checks, data, model, device, run directory, resume.

Every check that can fail on one rank goes through ``agree``, so all ranks fail together with one
message. The run directory is created (or an old one cleared) only once the inputs are known to be
valid, and a resume is checked against this run's config, model and data before anything moves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint import TrainState, check_mirror, mirror_dir, resume_checkpoint
from ..comm import make_backend
from ..comm.base import Communicator, agree
from ..config import Config
from ..data.dataset import TrainingData, load_training_data
from ..data.fingerprint import fingerprint
from ..data.reader import inspect_shared, inspect_spec
from ..data.shards import input_roles, is_multi, label, resolve
from ..data.stream import RowStream
from ..device import Device, select_device
from ..errors import ConfigError, DataError
from ..faults import FaultHooks, StopFlag
from ..log import Log
from ..models import Model, build_model, target_stats
from ..results import RunDir, check_run_dir, create_run_dir
from ..safety import note_leftovers
from .step import StepContext, Timers
from .strategies import check_comm_config, client_files, make_reduction
from .streamed import StreamedReduction
from .tensor import TensorGrid, check_grid, tensor_step_context


@dataclass
class RunSetup:
    """The checked pieces of one run: its data (placed where the kernels want it), model,
    device, communication backend and run directory (with rank 0's lock once created)."""

    cfg: Config
    comm: Communicator
    log: Log
    run: RunDir
    inputs: dict[str, str]
    backend: Any
    data: TrainingData
    fingerprint: dict
    dropped: int
    model: Model
    device: Device
    X: Any
    y: Any
    X_val: Any
    lock: Any = field(default=None)  # rank 0's lock on the run directory, to the end
    stream: RowStream | None = None  # data.stream: the rows are read from the file every pass
    grid: TensorGrid | None = None  # model.parallel = "tensor": this rank's place and slice

    @property
    def data_comm(self) -> Communicator:
        """The ranks the rows are cut over (all of them, or the grid's data group)."""
        return self.comm if self.grid is None else self.grid.data

    def meta(self) -> dict:
        """What identifies this run's state: config, model, data, scaler and optimiser."""
        config = self.cfg.to_dict()
        return {
            "config": config,
            "model": self.model.spec(),
            "ranks": self.comm.size,
            "scaler": self.data.scaler.kind,
            "n_features": self.model.n_features,
            "data": self.fingerprint,
            "optimizer": {k: v for k, v in config["optim"].items() if k != "lr"},
        }

    def step_context(self, timers: Timers, stop: StopFlag, hooks: FaultHooks) -> StepContext:
        """What the strategies need for a step of this run's model on its data and device."""
        cfg, model = self.cfg, self.model
        if self.grid is not None:  # the slice's step: training/tensor.py
            return tensor_step_context(self, timers, stop, hooks)
        act, head = model.codes
        ctx = StepContext(
            comm=self.comm,
            backend=self.backend,
            device=self.device,
            sizes=np.asarray(model.sizes, dtype=np.int64),
            act=act,
            head=head,
            l2_mask=model.weight_mask() * cfg.model.l2,  # L2 on weights, not on biases
            timers=timers,
            stop=stop,
            hooks=hooks,
        )
        file_rows = self.data.info.n_rows
        if self.stream is not None:  # block ids come with the pieces (or windows) read
            inner = make_reduction(cfg.comm, ctx, np.zeros(0, dtype=np.int64), file_rows)
            full = cfg.train.batch_size == 0
            ctx.reduction = StreamedReduction(inner, self.stream) if full else inner
            return ctx
        # Reproducible mode's block ids came with the data (4 bytes a row, no row ids).
        train, reproducible = self.data.train, cfg.comm.reproducible
        blocks = train.blocks if reproducible else None
        rows = train.rows if reproducible and blocks is None else np.zeros(0, dtype=np.int64)
        ctx.reduction = make_reduction(cfg.comm, ctx, rows, file_rows, blocks)
        return ctx

    def check_test_file(self) -> None:
        """A wrong test file fails now, not after hours of training."""
        cfg = self.cfg
        if cfg.data.test:
            test = inspect_shared(cfg.data.test, cfg.data.x, cfg.data.y, self.comm)
            agree(self.comm, lambda: self.check_test(test, None))

    def check_test(self, info, stats) -> None:
        """The test file has the model's features (and, given ``stats``, its labels)."""
        from ..models import check_labels
        from ..models.io import check_features

        check_features(
            self.model, info.n_features, f"'{info.path}:{info.x}'", str(self.run.model_file)
        )
        if stats is not None:
            check_labels(self.model, stats, f"'{info.path}:{info.y}'")

    def create_run_dir(self, overwrite: bool) -> None:
        if self.comm.is_root:
            self.lock = create_run_dir(self.run.path, overwrite=overwrite, inputs=self.inputs)
            if self.lock.warning:  # a file system without flock
                self.log.warning(self.lock.warning)
            note_leftovers(self.log, self.run.path, self.run.path / "checkpoints")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def initial_state(self, resume: str | None, opt) -> TrainState:
        """A fresh state (``opt``'s), or the checkpoint ``--resume`` names (``auto``: the newest
        good one)."""
        comm = self.comm
        if resume is not None:
            found = agree(comm, lambda: self._find_checkpoint(resume) if comm.is_root else None)
            found = comm.bcast(found)
            if found is not None:
                path, state = found
                self.log.info(f"resuming from {path} (epoch {state.epoch}, step {state.step})")
                return state
            self.log.info("no checkpoint to resume from: starting a new run")
        params = self.model.init_params(self.cfg.model.init, self.cfg.train.seed)
        return TrainState(params, opt.state(), meta=self.meta())

    def _find_checkpoint(self, resume: str):
        """Rank 0: the checkpoint to resume from, checked against this run (before any file of
        the directory is moved), on its branch; None when ``auto`` finds no checkpoint."""
        mirror = mirror_dir(self.cfg.checkpoint.mirror, self.run.path)
        return resume_checkpoint(resume, self.run.checkpoints, self.meta(), self.log, mirror)


def run_inputs(cfg: Config, resume: str | None, inputs: Mapping[str, str] | None) -> dict:
    """Files this run reads: never written or deleted, nor a directory holding one cleared.

    Shards (a glob pattern or a list) are each an input, ``data.train[i]``: a pattern is
    resolved here, so call this on one rank and share the result (``shared_run_inputs``). A
    pattern matching nothing is left as it is, for the data reader to name."""
    found = {**_data_inputs("data.train", cfg.data.train), **(inputs or {})}
    if cfg.data.test:
        found.update(_data_inputs("data.test", cfg.data.test))
    if resume not in (None, "auto"):
        found["resume"] = resume
    return found


def _data_inputs(role: str, spec) -> dict[str, str]:
    if not is_multi(spec):
        return {role: spec}
    try:
        return input_roles(role, resolve(spec, role))
    except DataError:
        return {role: label(spec)}


def shared_run_inputs(
    cfg: Config, resume: str | None, inputs: Mapping[str, str] | None, comm: Communicator
) -> dict:
    """``run_inputs`` resolved on rank 0 (one glob per pattern, not one per rank), shared."""
    if not (is_multi(cfg.data.train) or (cfg.data.test and is_multi(cfg.data.test))):
        return run_inputs(cfg, resume, inputs)
    return comm.bcast(
        agree(comm, lambda: run_inputs(cfg, resume, inputs) if comm.is_root else None)
    )


def prepare(
    cfg: Config,
    comm: Communicator,
    log: Log,
    timers: Timers,
    *,
    resume: str | None,
    overwrite: bool,
    inputs: Mapping[str, str] | None,
    source=None,
) -> RunSetup:
    """Check the configuration and run directory, load the data, build the model and device.

    ``source``: training rows already in memory (``data.memory.ArraySource``) instead of the
    file ``data.train``."""
    files = shared_run_inputs(cfg, resume, inputs, comm)
    run = RunDir(cfg.output.dir)
    agree(comm, lambda: check_comm_config(cfg))  # [comm] x [optim] combinations
    agree(comm, lambda: _balanceable(cfg, source))
    grid = None
    if cfg.model.parallel == "tensor":  # a data x tensor grid; rows cut over the data groups
        agree(comm, lambda: check_grid(cfg, comm.size, source))
        grid = TensorGrid(comm, cfg.comm.tensor_ranks)
    rows_comm = comm if grid is None else grid.data
    clients = None
    if cfg.comm.strategy == "fedavg":  # each rank a client with its own file
        clients = agree(comm, lambda: _clients(cfg, comm, source))
        files = {k: v for k, v in files.items() if not k.startswith("data.train")}
        files.update(input_roles("data.train", clients))
    backend = agree(comm, lambda: make_backend(cfg.comm.backend, comm))
    fresh = {"resume": resume is not None, "overwrite": overwrite, "inputs": files}
    agree(comm, lambda: check_run_dir(run.path, **fresh) if comm.is_root else None)
    mirror = cfg.checkpoint.mirror
    agree(comm, lambda: check_mirror(mirror, run.path, files) if comm.is_root else None)
    stream, stream_stats = None, None
    with timers("io"):
        if cfg.data.stream:  # a first pass fits the scaler; every later pass reads again
            agree(comm, lambda: _streamable(source))
            stream = RowStream(cfg.data, cfg.train.seed, comm, reproducible=cfg.comm.reproducible)
            train_split, val_split, scaler, stream_stats = stream.fit()
            log.info(stream.describe())
            data = TrainingData(train_split, val_split, scaler, stream.info)
        elif clients is not None:  # the client reads its file alone; the scaler is fitted on all
            own = dataclasses.replace(cfg.data, train=clients[comm.rank])
            data = load_training_data(own, cfg.train.seed, comm.split(comm.rank), log, stats=comm)
        else:

            def load() -> TrainingData:
                return load_training_data(
                    cfg.data,
                    cfg.train.seed,
                    rows_comm,
                    log,
                    reproducible=cfg.comm.reproducible,
                    source=source,
                )

            # On a grid each data group reads the rows alone: an error one of them finds (a
            # NaN in its rows) is shared with the whole job.
            data = load() if grid is None else agree(comm, load)
        # What the data hold (shapes, types, a hash of sampled rows): checkpoints and the
        # model carry it, and a resume on other data is refused.
        d = cfg.data
        if source is not None:
            data_fingerprint = source.fingerprint()  # the same on every rank
        else:
            read = clients or [s.path for s in data.info.shards] or data.info.path  # files read
            found = agree(comm, lambda: fingerprint(read, d.x, d.y) if comm.is_root else None)
            data_fingerprint = comm.bcast(found)
    train_name = source.name if source is not None else data.info.path
    train = data.train
    val_rows = data.val.n_global if data.val is not None else 0
    dropped = data.info.n_rows - train.n_global - val_rows
    if dropped:
        log.warning(
            f"dropped {dropped} of {data.info.n_rows} rows of '{train_name}' "
            'holding NaN or Inf (data.nonfinite = "drop")'
        )
    agree(comm, lambda: _check_rows(cfg, data, dropped))
    if stream is not None:
        y_shape = data.info.y_shape or (0,)
        y_dim, stats = (1 if len(y_shape) == 1 else y_shape[1]), stream_stats
    else:
        y_dim = 1 if train.y.ndim == 1 else train.y.shape[1]
        stats = target_stats(train.y, comm)  # on a grid every row k times: the same range
    where = f"'{train_name}:{cfg.data.y}'"
    model = agree(comm, lambda: build_model(cfg.model, data.info.n_features, y_dim, stats, where))
    train_cfg = cfg.train
    device = agree(
        comm,
        lambda: select_device(train_cfg.device, train_cfg.threads, comm, train_cfg.products),
    )
    if grid is not None:
        grid.set_model(model.sizes)
    if stream is not None:
        stream.place = device.place
        X = y = X_val = None
    else:
        X, y = device.place(train.X), device.place(train.y)
        X_val = None if data.val is None else device.place(data.val.X)
    return RunSetup(
        cfg=cfg,
        comm=comm,
        log=log,
        run=run,
        inputs=files,
        backend=backend,
        data=data,
        fingerprint=data_fingerprint,
        dropped=dropped,
        model=model,
        device=device,
        X=X,
        y=y,
        X_val=X_val,
        stream=stream,
        grid=grid,
    )


def _balanceable(cfg: Config, source) -> None:
    if cfg.data.balance != "none" and source is not None:
        raise ConfigError(
            "data.balance",
            f'"{cfg.data.balance}" reads the rows a rank gains from the training file: arrays '
            'in memory are not supported; set data.balance = "none"',
        )


def _streamable(source) -> None:
    if source is not None:
        raise ConfigError("data.stream", "streams rows from files, not arrays in memory")


def _clients(cfg: Config, comm: Communicator, source) -> list[str]:
    """fedavg's client files, one per rank, each checked readable with the features and
    targets named (before any rank reads alone: a missing file fails every rank together)."""
    if source is not None:
        raise ConfigError("comm.strategy", "fedavg trains on client files, not arrays in memory")
    files = client_files(cfg.data.train, comm.size)
    widths = {}
    for path in files if comm.is_root else []:  # rank 0 opens each file once
        widths[path] = inspect_spec(path, cfg.data.x, cfg.data.y, what="client file").n_features
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"'{p}': {w}" for p, w in widths.items())
        raise DataError(f"client files have different numbers of features ({shown})")
    return files


def _check_rows(cfg: Config, data: TrainingData, dropped: int) -> None:
    """Nothing left to train on (every row dropped or held out) is an error, not a run."""
    train, val = data.train, data.val
    if train.n_global == 0:
        held = f", {val.n_global} held out for validation" if val is not None else ""
        raise DataError(
            f"'{data.info.path}:{cfg.data.x}' leaves no training rows "
            f"({dropped} dropped as NaN or Inf{held})"
        )

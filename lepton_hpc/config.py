"""Training configuration: one dataclass per TOML section, loaded with tomllib, validated once.

``load_config(path, overrides)`` reads a TOML file, applies dotted ``section.key=value`` overrides
(the value keeps the field's type), and checks every key and value. Any unknown key, wrong type or
impossible value is a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, LeptonError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train: str | list[str] = ""
    """HDF5 file with the training rows (required); or shards read as one file holding their
    rows in order: a glob pattern ("data/part-*.h5", files sorted by name) or a list of files.
    Under comm.strategy = "fedavg" each rank is a client with its own file: a path holding
    "{rank}" ("clients/client-{rank}.h5"), or a list of one file per rank (not shards)."""
    test: str | list[str] = ""
    """Optional HDF5 file evaluated after training (a pattern or a list: shards, as for train)."""
    x: str = "X"
    """Data set of features, rows x features."""
    y: str = "y"
    """Data set of targets, one per row (class ids for classification)."""
    validation_fraction: float = 0.0
    """Fraction of training rows held out, chosen by a hash of the global row index and the seed."""
    scale: str = "none"
    """Feature scaling fitted on the training rows: "none", "zscore" or "minmax"."""
    nonfinite: str = "error"
    """Rows with NaN or Inf: "error" (default) or "drop" them."""
    folds: int = 0
    """k-fold cross-validation (set by ``lepton sweep``): rows are dealt into k folds by the same
    hash as the validation split, and fold ``fold`` is held out; 0 = off."""
    fold: int = 0
    """The fold held out for validation when ``folds`` >= 2."""
    stream: bool = False
    """Read the rows from the file every pass instead of holding them in memory: each rank reads
    its rows data.buffer_mb at a time, the next piece read ahead while the kernel works on this
    one (for data larger than the nodes' memory; full batch and lbfgs give the in-memory
    results, bitwise with comm.reproducible; mini-batches are shuffled within windows of the
    file: docs/reference.md, "Streaming")."""
    buffer_mb: float = 64.0
    """Per rank, with data.stream: the rows held at a time (two such pieces: one in use, one
    being read)."""
    balance: str = "none"
    """Load balancing of the training rows between ranks: "none" (an even split) or "speed":
    after the first epoch (and after any later epoch whose slowest rank's step work is more than
    10 % above the mean) each rank's speed (training rows per second of step work) is measured
    and the rows are re-cut into contiguous ranges in proportion to it (whole global blocks with
    comm.reproducible), when that predicts a step more than 10 % faster; a rank reads from the
    file only the rows it gains. Results equal the even split's (bitwise with
    comm.reproducible). Full batch or mini-batches, comm.strategy = "sync", in-memory rows
    from files only."""

    def __post_init__(self) -> None:
        for key in ("train", "test"):
            setattr(self, key, _data_files(getattr(self, key), f"data.{key}"))
        _check(
            0.0 <= self.validation_fraction < 1.0,
            "data.validation_fraction",
            f"{self.validation_fraction} is not in [0, 1)",
        )
        _check(self.folds != 1 and self.folds >= 0, "data.folds", f"{self.folds} is not 0 or >= 2")
        _check(
            0 <= self.fold < max(self.folds, 1), "data.fold", f"{self.fold} is not in [0, folds)"
        )
        _check(
            not (self.folds and self.validation_fraction),
            "data.folds",
            "folds and validation_fraction both choose validation rows: set one of them",
        )
        _one_of(self.scale, ("none", "zscore", "minmax"), "data.scale")
        _one_of(self.nonfinite, ("error", "drop"), "data.nonfinite")
        _one_of(self.balance, ("none", "speed"), "data.balance")
        _check(self.buffer_mb > 0, "data.buffer_mb", f"{self.buffer_mb} is not a positive size")


def _data_files(value: Any, key: str) -> str | list[str]:
    """``data.train`` / ``data.test``: a path or pattern (a string), or a list of paths (shards;
    a one-item list is that file). A NUL byte or an empty list item is refused."""
    if isinstance(value, str):
        _check("\0" not in value, key, "a path cannot hold a NUL byte")
        return value
    _check(isinstance(value, list), key, f"expected a path or a list of paths, got {value!r}")
    _check(bool(value), key, "the list of files is empty")
    for i, item in enumerate(value):
        ok = isinstance(item, str) and item != "" and "\0" not in item
        _check(ok, f"{key}[{i}]", f"expected a file path, got {item!r}")
    return value[0] if len(value) == 1 else list(value)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    kind: str = "logistic"
    """"linear" (regression), "logistic" (binary), "softmax" (multi-class) or "mlp"."""
    hidden: list[int] = field(default_factory=list)
    """Hidden layer widths of an MLP, e.g. [64, 32]."""
    activation: str = "relu"
    """Hidden activation: "sigmoid", "tanh" or "relu"."""
    init: str = "auto"
    """"uniform", "xavier", "he", "zeros" or "auto" (He for ReLU, else Xavier; zeros if convex)."""
    task: str = "auto"
    """MLP head: "regression", "binary", "multiclass", or "auto" (from the labels)."""
    l2: float = 0.0
    """L2 penalty on weights (not biases), added to the mean loss as l2/2 * |w|^2."""
    max_classes: int = 1000
    """Most classes a multi-class model may have: a larger label is taken for a data error."""
    parallel: str = "none"
    """"none" (every rank holds the whole model) or "tensor" (an MLP's hidden layers split over
    comm.tensor_ranks ranks, Megatron-LM's column/row pairs; docs/design.md, "Tensor
    parallelism")."""

    def __post_init__(self) -> None:
        _one_of(self.kind, ("linear", "logistic", "softmax", "mlp"), "model.kind")
        _one_of(self.activation, ("sigmoid", "tanh", "relu"), "model.activation")
        _one_of(self.init, ("auto", "uniform", "xavier", "he", "zeros"), "model.init")
        _one_of(self.task, ("auto", "regression", "binary", "multiclass"), "model.task")
        _check(
            all(h > 0 for h in self.hidden), "model.hidden", f"widths must be > 0: {self.hidden}"
        )
        _check(self.l2 >= 0, "model.l2", f"{self.l2} is negative")
        _check(self.max_classes >= 2, "model.max_classes", f"{self.max_classes} must be >= 2")
        _one_of(self.parallel, ("none", "tensor"), "model.parallel")
        if self.kind != "mlp":
            _check(
                not self.hidden, "model.hidden", f"only an mlp has hidden layers, not {self.kind!r}"
            )


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: str = "adam"
    """"sgd", "momentum", "adam" or "lbfgs" (full batch, convex models)."""
    lr: float = 0.01
    """Learning rate (step size); L-BFGS uses it as the first trial step."""
    momentum: float = 0.9
    """Momentum coefficient for "momentum" (and "sgd" when > 0 is wanted, set name="momentum")."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    history: int = 10
    """L-BFGS memory (pairs kept)."""

    def __post_init__(self) -> None:
        _one_of(self.name, ("sgd", "momentum", "adam", "lbfgs"), "optim.name")
        _check(self.lr > 0, "optim.lr", f"{self.lr} must be > 0")
        _check(0 <= self.momentum < 1, "optim.momentum", f"{self.momentum} is not in [0, 1)")
        _check(0 <= self.beta1 < 1, "optim.beta1", f"{self.beta1} is not in [0, 1)")
        _check(0 <= self.beta2 < 1, "optim.beta2", f"{self.beta2} is not in [0, 1)")
        _check(self.eps > 0, "optim.eps", f"{self.eps} must be > 0")
        _check(self.history > 0, "optim.history", f"{self.history} must be > 0")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    epochs: int = 10
    """Passes over the training rows."""
    batch_size: int = 0
    """Global batch (rows per step, split across ranks); 0 = full batch."""
    max_steps: int = 0
    """Stop after this many steps; 0 = no limit."""
    seed: int = 42
    """Seeds initialisation, shuffling and the validation split; never combined with the rank."""
    device: str = "cpu"
    """"cpu", "cuda" or "auto" (a GPU when Numba sees one)."""
    threads: int = 0
    """Numba threads per rank; 0 = the node's cores divided by the ranks on the node."""
    products: str = "float64"
    """Precision of the training passes' products: "float64", or "float32" on the CPU for MLPs
    with a hidden layer of 64 units or more (float32 GEMMs and activations, each block of rows
    summed into float64: about 1.2-1.8x faster) and for one-output models (linear, logistic) on
    float32 data of more than 40 features (float32 products, each row's and each 8-row group's
    sums in float32, the rest in float64: as fast up to 256 features, up to 1.1x faster at
    512-1024 on the AVX-512 CPU measured); gradients within about 1e-6 of float64.
    Predictions, metrics, other models and the GPU kernels compute in float64 either way."""
    patience: int = 0
    """Early stopping: epochs without validation improvement before stopping; 0 = off."""
    log_every: int = 1
    """Print a progress line every this many epochs."""

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", f"{self.epochs} must be > 0")
        _check(self.batch_size >= 0, "train.batch_size", f"{self.batch_size} is negative")
        _check(self.max_steps >= 0, "train.max_steps", f"{self.max_steps} is negative")
        _check(self.seed >= 0, "train.seed", f"{self.seed} is negative")
        _one_of(self.device, ("cpu", "cuda", "auto"), "train.device")
        _check(self.threads >= 0, "train.threads", f"{self.threads} is negative")
        _one_of(self.products, ("float64", "float32"), "train.products")
        _check(self.patience >= 0, "train.patience", f"{self.patience} is negative")
        _check(self.log_every > 0, "train.log_every", f"{self.log_every} must be > 0")


@dataclass(kw_only=True, slots=True)
class CommConfig:
    backend: str = "mpi"
    """"mpi" (mpi4py) or "horovod"."""
    strategy: str = "sync"
    """"sync" (average gradients each step), "local_sgd" (average parameters), "overlap",
    "fedavg" (federated averaging: each rank a client with its own data file) or "async"
    (each rank updates a shared model on rank 0 without waiting for the others)."""
    max_staleness: int = 8
    """"async": a gradient computed on parameters more than this many updates old is dropped
    (the rank computes again on the current ones)."""
    local_steps: int = 8
    """Local steps between parameter averages for "local_sgd"."""
    local_epochs: int = 1
    """"fedavg": epochs each sampled client trains on its own rows per round."""
    client_fraction: float = 1.0
    """"fedavg": fraction of clients sampled each round (seeded by train.seed and the round;
    at least one)."""
    prox_mu: float = 0.0
    """"fedavg": FedProx term mu/2 |w - w_global|^2 added to each client's loss; 0 = off."""
    compression: str = "none"
    """Allreduce payload: "none", "fp16" or "bf16" (with error feedback)."""
    reproducible: bool = False
    """Bitwise identical results for any rank count (fixed global reduction order)."""
    tensor_ranks: int = 1
    """With model.parallel = "tensor": ranks that split each layer pair (must divide the rank
    count and every width it splits); the ranks form a grid of (ranks / tensor_ranks) data
    groups x tensor_ranks."""

    def __post_init__(self) -> None:
        _one_of(self.backend, ("mpi", "horovod"), "comm.backend")
        _one_of(self.strategy, ("sync", "local_sgd", "overlap", "fedavg", "async"), "comm.strategy")
        _check(
            self.max_staleness >= 0,
            "comm.max_staleness",
            f"{self.max_staleness} must be >= 0",
        )
        _check(self.local_steps > 0, "comm.local_steps", f"{self.local_steps} must be > 0")
        _check(self.local_epochs >= 1, "comm.local_epochs", f"{self.local_epochs} must be >= 1")
        _check(
            0.0 < self.client_fraction <= 1.0,
            "comm.client_fraction",
            f"{self.client_fraction} is not in (0, 1]",
        )
        _check(self.prox_mu >= 0.0, "comm.prox_mu", f"{self.prox_mu} is negative")
        _one_of(self.compression, ("none", "fp16", "bf16"), "comm.compression")
        _check(self.tensor_ranks >= 1, "comm.tensor_ranks", f"{self.tensor_ranks} must be >= 1")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every_steps: int = 0
    """Checkpoint every this many steps; 0 = only at the end of each epoch."""
    keep: int = 3
    """Checkpoints kept (the newest)."""
    mirror: str = ""
    """A second directory (ideally another file system) that gets a copy of every checkpoint,
    written in the background; --resume auto takes the newest valid of either. "" = off."""
    watchdog_s: float | str = "auto"
    """End the job (exit 76) when the step has not advanced for this many seconds; 0 = off.
    "auto" (default): 600 s for each of a process's first 5 steps (kernel compilation), then
    20 x the slowest step seen since, at least 120 s; evaluation and checkpoint writes between
    steps get max(600 s, 20 x the slowest such phase). Never reached by a healthy run."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", f"{self.every_steps} is negative")
        _check(self.keep > 0, "checkpoint.keep", f"{self.keep} must be > 0")
        _check("\0" not in self.mirror, "checkpoint.mirror", "a path cannot hold a NUL byte")
        self.watchdog_s = _watchdog_seconds(self.watchdog_s)


def _watchdog_seconds(value: Any) -> float | str:
    """``checkpoint.watchdog_s``: "auto", or a finite number of seconds >= 0 (as a float)."""
    if value == "auto":
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    _check(
        number and math.isfinite(value) and value >= 0,
        "checkpoint.watchdog_s",
        f'expected "auto" or a number of seconds >= 0 (0 = off), got {value!r}',
    )
    return float(value)


@dataclass(kw_only=True, slots=True)
class OutputConfig:
    dir: str = "runs/default"
    """Run directory: results.json, metrics.jsonl, model.h5, checkpoints/, history.png."""
    plot: bool = True
    """Draw history.png (needs matplotlib)."""


@dataclass(kw_only=True, slots=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
SECTIONS = {name: globals()[cls] if isinstance(cls, str) else cls for name, cls in SECTIONS.items()}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted for floats, nothing else."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        return value
    if annotation is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"expected an integer, got {value!r}",
        )
        _check(abs(value) < 2**63, key, f"{value} does not fit in 64 bits")
        return value
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        _check(math.isfinite(value), key, f"expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {annotation!r}")  # pragma: no cover - a bug if hit


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as TOML, else taken as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "an override must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a ``Config`` from nested dicts; every key is checked."""
    sections: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(name, f"unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(body, dict):
            raise ConfigError(name, "expected a table of keys")
        cls = SECTIONS[name]
        types_ = _field_types(cls)
        values = {}
        for key, value in body.items():
            dotted = f"{name}.{key}"
            if key not in types_:
                raise ConfigError(dotted, f"unknown key (known in [{name}]: {', '.join(types_)})")
            values[key] = _coerce(value, types_[key], dotted)
        sections[name] = cls(**values)
    return Config(**sections)


def merge_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to nested dicts (a copy); the result is validated by the caller."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        path, value = _parse_override(text)
        if len(path) != 2:
            raise ConfigError(".".join(path), "an override must be section.key=value")
        section, key = path
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section (known: {', '.join(SECTIONS)})")
        types_ = _field_types(SECTIONS[section])
        if key in types_ and _takes_text(types_[key]) and not isinstance(value, str | list):
            value = text.partition("=")[2].strip()  # data.train=2024.h5 stays a path
        if key in types_ and types_[key] is str and not isinstance(value, str):
            value = text.partition("=")[
                2
            ].strip()  # optim.name=adam, output.dir=runs/1 stay strings
        merged.setdefault(section, {})[key] = value
    return merged


def _takes_text(annotation: Any) -> bool:
    """A field that is a string or a list of strings (``data.train``, ``data.test``)."""
    return typing.get_origin(annotation) in (types.UnionType, typing.Union) and set(
        typing.get_args(annotation)
    ) == {str, list[str]}


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise LeptonError(f"config file '{p}' does not exist") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise LeptonError(f"config file '{p}' cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise LeptonError(f"config file '{p}' is not valid TOML: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_toml(path) if path is not None else {}
    return check_config(config_from_dict(merge_overrides(raw, list(overrides))))


def check_config(cfg: Config) -> Config:
    """Checks across sections (``load_config`` and ``lepton sweep`` run them on every config)."""
    _check_tensor(cfg)
    _check_balance(cfg)
    if cfg.optim.name == "lbfgs":
        _check(
            cfg.model.kind in ("linear", "logistic", "softmax"),
            "optim.name",
            "lbfgs is for the convex models (linear, logistic, softmax)",
        )
        _check(cfg.train.batch_size == 0, "optim.name", "lbfgs needs train.batch_size = 0")
    if cfg.data.stream:
        _check(
            cfg.comm.strategy == "sync",
            "data.stream",
            f'needs comm.strategy = "sync" (not {cfg.comm.strategy!r}): streamed rows are read '
            "once per step for the whole rank",
        )
    train = cfg.data.train
    _check(
        cfg.comm.strategy == "fedavg" or not (isinstance(train, str) and "{rank}" in train),
        "data.train",
        f'{train!r}: a "{{rank}}" pattern (one file per client) needs comm.strategy = "fedavg"',
    )
    return cfg


def _check_balance(cfg: Config) -> None:
    """``data.balance = "speed"``: the combinations it supports, each refusal naming the key."""
    if cfg.data.balance == "none":
        return
    _check(
        not cfg.data.stream,
        "data.balance",
        '"speed" moves rows held in memory: data.stream is not supported; set one of them off',
    )
    _check(
        cfg.model.parallel != "tensor",
        "data.balance",
        '"speed" is not supported with model.parallel = "tensor" (a tensor group\'s ranks hold '
        'the same rows); set data.balance = "none"',
    )
    _check(
        cfg.comm.strategy == "sync",
        "data.balance",
        f'"speed" needs comm.strategy = "sync" (not {cfg.comm.strategy!r}): other strategies\' '
        'results depend on the partition; set data.balance = "none"',
    )


def _check_tensor(cfg: Config) -> None:
    """``model.parallel = "tensor"``: the combinations it supports, each refusal naming the key.
    (That comm.tensor_ranks divides the rank count is checked when the job starts.)"""
    k, c = cfg.comm.tensor_ranks, cfg.comm
    if cfg.model.parallel != "tensor":
        _check(k == 1, "comm.tensor_ranks", f'{k} needs model.parallel = "tensor"')
        return
    why = 'with model.parallel = "tensor"'
    _check(
        cfg.model.kind == "mlp",
        "model.parallel",
        f'"tensor" splits an MLP\'s hidden layers, not a {cfg.model.kind!r} model',
    )
    _check(
        bool(cfg.model.hidden),
        "model.hidden",
        f"{why} the MLP needs at least one hidden layer to split",
    )
    for i in range(0, len(cfg.model.hidden), 2):  # the column-parallel layers' widths
        w = cfg.model.hidden[i]
        _check(
            w % k == 0,
            "comm.tensor_ranks",
            f"{k} does not divide model.hidden[{i}] = {w} (the widths split: "
            f"{cfg.model.hidden[::2]})",
        )
    _check(
        cfg.optim.name != "lbfgs",
        "optim.name",
        f'lbfgs is not supported {why} (use "sgd", "momentum" or "adam")',
    )
    _check(not cfg.data.stream, "data.stream", f"is not supported {why}: set false")
    _check(
        c.strategy == "sync",
        "comm.strategy",
        f'{c.strategy!r} is not supported {why}: only "sync"',
    )
    _check(
        not c.reproducible,
        "comm.reproducible",
        f"is not supported {why}: the tensor group's partial sums are added in an order that "
        "depends on comm.tensor_ranks, so results agree with data parallelism to rounding, "
        "not bitwise",
    )
    _check(c.compression == "none", "comm.compression", f'must be "none" {why}')
    _check(c.backend == "mpi", "comm.backend", f'must be "mpi" {why}')
    # train.device: any ("cpu": kernels.tensor, "cuda": kernels.cuda_tensor, "auto": either)

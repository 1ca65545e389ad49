"""``train(config, ...)``: a training run from a Python script, the same as ``lepton train``.

Every rank of the job calls ``train`` (SPMD: ``python script.py`` alone, or ``mpiexec -n 3
python script.py``); it loads and checks the config, creates the same run directory and runs the
same engine as the command line, so a script and ``lepton train`` on one config give the same
bits. Differences are only in how failure is reported: instead of printing one line and
exiting, ``train`` raises the ``LeptonError`` subclass the command would have printed.

Overrides, one convention with two spellings, both meaning ``section.key = value`` with a
Python value (not TOML text):

- keywords ``section__key=value``: ``train(cfg, optim__lr=0.1, train__epochs=5)``;
- a mapping with dotted keys: ``train(cfg, overrides={"optim.lr": 0.1})``.

A list of the command line's strings, ``overrides=["optim.lr=0.1"]`` (values read as TOML), is
accepted too. Keywords are applied last.

An error every rank sees together (bad config, bad data, a refused run directory, a signal stop)
is raised on every rank, so a script may catch it and carry on. An error only one rank sees
cannot be raised alone under MPI (the other ranks would wait forever in their next collective):
as with the command line, that rank prints it and the job is aborted.
"""

from __future__ import annotations

import copy
import json
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..comm.base import Communicator
from ..config import (
    SECTIONS,
    Config,
    check_config,
    config_from_dict,
    merge_overrides,
    read_toml,
)
from ..errors import EXIT_FAILED, ConfigError, LeptonError
from ..log import Log

__all__ = ["Run", "train"]

T = TypeVar("T")


@dataclass
class Run:
    """A finished run: its directory, results, per-epoch history and trained model.

    ``results``: the dict written to ``results.json``; ``history``: one dict per finished epoch,
    as ``metrics.jsonl`` records it; ``model``: the model loaded in-process when
    ``lepton_hpc.api.model.load_model`` is available, else None (``model_path`` always names
    ``model.h5``)."""

    dir: Path
    results: dict
    history: list[dict]
    config: Config
    model_path: Path
    model: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, directory: str | Path, results: dict | None = None) -> Run:
        """A ``Run`` from an existing run directory (its results.json and metrics.jsonl)."""
        d = Path(directory)
        if results is None:
            try:
                results = json.loads((d / "results.json").read_text())
            except (OSError, ValueError) as exc:
                raise LeptonError(
                    f"run directory '{d}' has no readable results.json ({exc})"
                ) from None
        cfg = config_from_dict(results.get("config", {}))
        history = _read_history(d)
        return cls(d, results, history, cfg, d / "model.h5", _load_model(d / "model.h5"))


def _read_history(d: Path) -> list[dict]:
    """The per-epoch lines of ``d/metrics.jsonl`` (none when the file is absent)."""
    metrics = d / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _load_model(path: Path) -> Any:
    """The in-process model of ``path`` when the model API is installed; None otherwise."""
    try:
        from .model import load_model  # type: ignore[attr-defined]
    except ImportError:
        return None
    return load_model(path)


def build_config(
    config: str | Path | Mapping[str, Any] | Config | None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    **keywords: Any,
) -> Config:
    """A checked ``Config`` from a TOML path, a dict of sections or a ``Config``, with
    overrides applied (see the module docstring for their two spellings)."""
    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, Config):
        raw = config.to_dict()
    elif isinstance(config, str | Path):
        raw = read_toml(config)
    elif isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    else:
        raise LeptonError(
            f"config must be a TOML path, a dict of sections or a Config, not {type(config)}"
        )
    if isinstance(overrides, list | tuple):  # the command line's "optim.lr=0.1" strings
        raw = merge_overrides(raw, [str(o) for o in overrides])
        overrides = None
    items = list((overrides or {}).items())
    for key, value in keywords.items():
        section, sep, name = key.partition("__")
        if not sep or not section or not name:
            raise ConfigError(key, "a keyword override must look like section__key=value")
        items.append((f"{section}.{name}", value))
    for dotted, value in items:
        section, sep, name = str(dotted).partition(".")
        if not sep or "." in name or not name:
            raise ConfigError(str(dotted), "an override must be 'section.key'")
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section (known: {', '.join(SECTIONS)})")
        body = raw.setdefault(section, {})
        if not isinstance(body, dict):
            raise ConfigError(section, "expected a table of keys")
        body[name] = list(value) if isinstance(value, tuple) else value
    return check_config(config_from_dict(raw))


def train(
    config: str | Path | Mapping[str, Any] | Config,
    overrides: Mapping[str, Any] | list[str] | None = None,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    comm: Communicator | None = None,
    log: Log | None = None,
    **keywords: Any,
) -> Run:
    """Train as ``lepton train CONFIG`` does, on every rank of the job; returns the ``Run``.

    ``resume``: "auto" (the newest good checkpoint of the run directory) or a checkpoint path,
    as ``--resume``; ``overwrite``: replace an existing run directory, as ``--overwrite``.
    ``comm``: the communicator (default: the job's world); ``log``: where rank 0 prints.
    Raises a ``LeptonError`` (a ``ConfigError``, ``DataError``, ``Stopped`` after a signal...)
    where the command would exit non-zero."""
    from ..comm import world

    comm = comm or world()
    log = log or Log(comm.rank, comm.size)
    return _guarded(
        comm, log, lambda: _train(config, overrides, keywords, resume, overwrite, comm, log)
    )


def _train(config, overrides, keywords, resume, overwrite, comm: Communicator, log: Log) -> Run:
    from ..cli import start_hooks
    from ..engine import train as engine_train
    from ..faults import StopFlag

    stop = StopFlag()  # from the start: a SIGUSR1 while loading must not kill the ranks
    stop.install()
    try:
        start_hooks(comm, log)
        cfg = agree_typed(comm, lambda: build_config(config, overrides, **keywords))
        if not cfg.data.train:
            agree_typed(comm, _missing_train)
        log.info(
            f"lepton train: {cfg.model.kind} on {cfg.data.train} with {comm.size} rank(s), "
            f"optimizer {cfg.optim.name}, run directory {cfg.output.dir}"
        )
        inputs = {"config": str(config)} if isinstance(config, str | Path) else None
        results = engine_train(
            cfg, comm, log, resume=resume, overwrite=overwrite, stop=stop, inputs=inputs
        )
    finally:
        stop.restore()
    d = Path(cfg.output.dir)
    history = comm.bcast(_read_history(d) if comm.is_root else None)  # rank 0's file
    return Run(d, results, history, cfg, d / "model.h5", _load_model(d / "model.h5"))


def _missing_train() -> None:
    raise ConfigError("data.train", "is required (an HDF5 file)")


def agree_typed(comm: Communicator, fn: Callable[[], T]) -> T:
    """``comm.base.agree`` that keeps the error's class: when ``fn`` raised a ``LeptonError`` on
    any rank, every rank raises the lowest failing rank's error, as the same subclass (a script
    can catch ``ConfigError``), marked collective."""
    result: Any = None
    failure = None
    try:
        result = fn()
    except LeptonError as exc:
        failure = (type(exc), str(exc), dict(vars(exc)))
    failures = [f for f in comm.allgather(failure) if f is not None]
    if failures:
        cls, message, attrs = failures[0]
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        error.__dict__.update(attrs)
        error.collective = True
        raise error
    return result


def _guarded(comm: Communicator, log: Log, fn):
    """Run ``fn`` on every rank: collective errors propagate; under MPI, an error seen by one
    rank alone is printed with its rank and ends the job, as ``lepton``'s guard does."""
    try:
        return fn()
    except LeptonError as exc:
        if exc.collective or comm.size == 1:
            raise
        log.error(str(exc))
        comm.abort(exc.exit_code)
        raise
    except Exception as exc:
        if comm.size == 1:
            raise
        tb = "".join(traceback.format_exception(exc))
        print(
            f"lepton: unexpected error on rank {comm.rank} of {comm.size}:\n{tb}",
            file=sys.stderr,
            flush=True,
        )
        comm.abort(EXIT_FAILED)
        raise

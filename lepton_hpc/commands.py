"""Subcommands of ``lepton``: each a ``register(subparsers)`` and a ``run(args, comm, log)``.

They run the same alone, under ``mpirun -n N`` or under ``srun``; rank 0 prints. This is the
command-line glue only: arguments in, a call into ``engine`` (train), ``inference`` (evaluate,
predict), ``batch_predict``, ``sweep`` or ``data``, and the summary lines out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .bench import register_bench
from .comm.base import Communicator, agree
from .convert_cmd import register_convert
from .export_cmd import register_export
from .inspect_cmd import register_inspect
from .log import Log
from .split_cmd import register_split
from .supervisor import register_launch
from .sweep import register_sweep
from .warmup import register_warmup


# ---- datagen ---------------------------------------------------------------------------
def register_datagen(sub) -> None:
    p = sub.add_parser("datagen", help="write a synthetic data set (all ranks write in parallel)")
    p.add_argument("--task", choices=("linear", "logistic", "blobs"), required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.1, help="target noise (linear)")
    p.add_argument("--classes", type=int, default=3, help="classes (blobs)")
    p.add_argument(
        "--start-row",
        type=int,
        default=0,
        help="first row of the seed's stream (a test set: the training row count)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=run_datagen)


def run_datagen(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .data.synth import write_dataset
    from .errors import LeptonError

    def check() -> None:
        if args.rows < comm.size or args.features < 1 or args.seed < 0 or args.start_row < 0:
            raise LeptonError(
                f"--rows {args.rows} must be >= the {comm.size} ranks, "
                f"--features >= 1 and --seed >= 0"
            )

    agree(comm, check)
    write_dataset(
        args.out,
        args.task,
        args.rows,
        args.features,
        args.seed,
        comm,
        noise=args.noise,
        classes=args.classes,
        force=args.force,
        start_row=args.start_row,
    )
    log.info(
        f"wrote {args.out}: {args.rows} rows x {args.features} features ({args.task}, "
        f"seed {args.seed}, {comm.size} writer rank{'s' if comm.size > 1 else ''})"
    )
    return 0


# ---- train -----------------------------------------------------------------------------
def register_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config")
    p.add_argument("config", help="TOML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05")
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest good checkpoint of the run directory (auto) or from PATH",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .config import load_config
    from .data.shards import label as shard_label
    from .engine import train
    from .faults import StopFlag
    from .metrics import headline

    stop = StopFlag()  # from the start: a SIGUSR1 while loading must not kill the ranks
    stop.install()
    cfg = agree(comm, lambda: load_config(args.config, args.overrides))
    if not cfg.data.train:
        agree(comm, _missing_train)
    log.info(
        f"lepton train: {cfg.model.kind} on {shard_label(cfg.data.train)} with {comm.size} "
        f"rank(s), optimizer {cfg.optim.name}, run directory {cfg.output.dir}"
    )
    res = train(
        cfg,
        comm,
        log,
        resume=args.resume,
        overwrite=args.overwrite,
        stop=stop,
        inputs={"config": args.config},
    )
    t = res["timing"]
    log.info("")
    for part, m in res["metrics"].items():
        log.info(f"  {part:<5} {headline(m)}")
    log.info(
        f"  throughput {res['throughput']['rows_per_s']:,.0f} rows/s on {comm.size} rank(s), "
        f"{res['threads_per_rank']} thread(s) each ({res['device']})"
    )
    log.info(
        f"  time {t['total_s']:.2f} s: io {t['io_s']:.2f}  compute {t['compute_s']:.2f}  "
        f"comm {t['comm_s']:.3f}  eval {t['eval_s']:.2f}  checkpoint {t['checkpoint_s']:.2f}"
        + (f"  compile {t['compile_s']:.2f}" if t.get("compile_s", 0.0) > 0.005 else "")
    )
    log.info(
        f"  run directory {cfg.output.dir}/ (results.json, metrics.jsonl, model.h5, history.png)"
    )
    return 0


def _missing_train() -> None:
    from .errors import ConfigError

    raise ConfigError("data.train", "is required (an HDF5 file)")


# ---- evaluate --------------------------------------------------------------------------
def register_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained model on a data set")
    p.add_argument("--model", required=True, help="model.h5 of a run")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="HDF5 file with features and targets; several files or a quoted glob are shards",
    )
    p.add_argument("--x", default=None, help="features data set (default: as in training)")
    p.add_argument("--y", default=None, help="targets data set (default: as in training)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .data.h5 import check_writable
    from .data.shards import input_roles, label, resolve
    from .inference import evaluate, load_for_inference
    from .safety import check_not_input

    args.data = one_or_shards(args.data)

    def check_json() -> None:
        if args.json and comm.is_root:
            inputs = {"model": args.model, **input_roles("data", resolve(args.data, "--data"))}
            check_not_input(args.json, inputs, "--json")
            check_writable(args.json, force=args.force)

    agree(comm, check_json)  # before any work: a refused output costs nothing
    model, params, split, device = load_for_inference(args, comm, log, with_y=True)
    metrics = evaluate(model, params, split.X, split.y, device, comm)
    log.info(f"{args.model} on {label(args.data)} ({metrics['rows']} rows, {comm.size} rank(s))")
    for key, value in metrics.items():
        if isinstance(value, float):
            log.info(f"  {key:<10} {value:.6f}")
    if "confusion" in metrics:
        log.info("  confusion (rows: true class, columns: predicted)")
        for row in metrics["confusion"]:
            log.info("    " + " ".join(f"{v:>8d}" for v in row))
    if args.json:
        payload = {"model": args.model, "data": args.data, "metrics": metrics}
        agree(comm, lambda: _write_json_output(Path(args.json), payload) if comm.is_root else None)
    return 0


def one_or_shards(data: list[str]) -> str | list[str]:
    """``--data`` as given: one path (or glob pattern) alone, else the list of shard files."""
    return data[0] if len(data) == 1 else list(data)


def _write_json_output(path: Path, payload: dict) -> None:
    """Write a --json output atomically; a failed write is the user's to fix (a full disk)."""
    from .errors import LeptonError
    from .safety import write_json

    try:
        write_json(path, payload)
    except OSError as exc:
        raise LeptonError(f"cannot write --json '{path}': {exc.strerror}") from None


# ---- predict ---------------------------------------------------------------------------
def register_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict every row of a data set, in parallel")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="HDF5 file, several files or a quoted glob such as 'inputs/*.h5'",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output HDF5 file (several --data files are shards: one output in row order); a "
        "directory (ending in '/') for one output per input file",
    )
    p.add_argument("--x", default=None)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output file (never the --data or --model file)",
    )
    p.set_defaults(func=run_predict, y=None)


def run_predict(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .batch_predict import is_batch, predict_files
    from .inference import predict_one

    args.data = one_or_shards(args.data)
    if is_batch(args.data, args.out):  # one task per file through the task farm
        predict_files(args.model, args.data, args.out, comm, log, args.force, x=args.x)
    else:
        predict_one(args.model, args.data, args.out, comm, log, args.force, x=args.x)
    return 0


# ---- doctor ----------------------------------------------------------------------------
def register_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check MPI, parallel h5py, GPU, Horovod and the run directory"
    )
    p.add_argument("--run-dir", default="runs", help="directory whose file system must be writable")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .doctor import run_checks

    checks = run_checks(comm, Path(args.run_dir))
    if args.json:
        log.info(json.dumps(checks, indent=2))
    else:
        for c in checks:
            log.info(
                f"[{'ok' if c['ok'] else ('warn' if not c['required'] else 'FAIL'):>4}] "
                f"{c['name']:<22} {c['detail']}"
            )
    return 0 if all(c["ok"] or not c["required"] for c in checks) else 1


REGISTRY = [
    register_datagen,
    register_convert,
    register_split,
    register_inspect,
    register_train,
    register_evaluate,
    register_predict,
    register_export,
    register_doctor,
    register_sweep,
    register_bench,
    register_launch,
    register_warmup,
]

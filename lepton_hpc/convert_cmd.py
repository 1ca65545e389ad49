"""``lepton convert``: CSV, NPY, NPZ or Parquet into HDF5 (the work is in ``data/convert.py``).

Into one file, the input formats are serial, so rank 0 converts and the other ranks wait for its
verdict: under ``mpirun`` every rank exits together, and an error is printed once. With
``--shards N`` (``data/convert_shards.py``) the rows go into N files in the directory ``--out``,
and the ranks share the shards.
"""

from __future__ import annotations

import argparse

from .comm.base import Communicator, agree
from .log import Log

DEFAULT_CHUNK_ROWS = 65_536


def register_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="CSV, NPY, NPZ or Parquet into HDF5 (streamed: files larger than memory convert)",
    )
    p.add_argument(
        "input",
        nargs="+",
        help="INPUT.csv, INPUT.npy, INPUT.npz or INPUT.parquet; Parquet: also several files "
        "or a directory of them (one table)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="HDF5 file to write; with --shards, the directory of the shard files",
    )
    p.add_argument(
        "--shards",
        type=int,
        metavar="N",
        default=None,
        help="write N files OUT/part-00000.h5 ... (contiguous rows, as even as possible; "
        "train on 'OUT/part-*.h5'), the ranks sharing them",
    )
    p.add_argument("--x", default="X", help="features data set written (NPZ: member read too)")
    p.add_argument("--y", default="y", help="target data set written (NPZ: member read too)")
    p.add_argument(
        "--target-column",
        metavar="NAME|INDEX",
        default=None,
        help="CSV/NPY/Parquet column of the target: header name or 0-based index "
        "(default: the last)",
    )
    p.add_argument(
        "--columns",
        metavar="A,B,...",
        default=None,
        help="Parquet feature columns, names or 0-based indices (default: all but the target)",
    )
    p.add_argument("--no-target", action="store_true", help="every column is a feature; no y")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"rows read and written at a time (default {DEFAULT_CHUNK_ROWS})",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="features' type (default: float32 for float32 sources, else float64)",
    )
    p.add_argument("--delimiter", default=",", help="CSV field separator (default ',')")
    p.add_argument(
        "--missing",
        choices=("error", "nan"),
        default="error",
        help="empty CSV cells and Parquet nulls: an error (default) or NaN "
        "(train with data.nonfinite = drop)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output file (--shards: the shard files in a non-empty OUT)",
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .data.convert import Options, convert_file

    opts = Options(
        x=args.x,
        y=args.y,
        target_column=args.target_column,
        columns=args.columns,
        no_target=args.no_target,
        chunk_rows=args.chunk_rows,
        dtype=args.dtype,
        delimiter=args.delimiter,
        missing=args.missing,
        force=args.force,
    )

    src = args.input[0] if len(args.input) == 1 else args.input
    if args.shards is not None:
        from .data.convert_shards import convert_shards

        summary = convert_shards(src, args.out, opts, args.shards, comm, log)
    else:
        summary = agree(
            comm, lambda: convert_file(src, args.out, opts, log) if comm.is_root else None
        )
    if summary is not None:
        log.info(summary)
    return 0

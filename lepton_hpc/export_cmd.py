"""``lepton export``: a trained model.h5 as an ONNX file (the work is in ``api/onnx_export.py``).

One small file is written, so rank 0 does all of it and the other ranks wait for its verdict:
alone or under ``mpirun`` the command behaves the same, and an error is printed once. The usual
``--out`` rules hold: an existing file is replaced only with ``--force``, the model never.
"""

from __future__ import annotations

import argparse
import warnings

from .comm.base import Communicator, agree
from .log import Log

DEFAULT_OPSET = 17  # kept equal to api.onnx_export.DEFAULT_OPSET (checked by the tests)


def register_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a trained model as ONNX, for onnxruntime and other runtimes"
    )
    p.add_argument("--model", required=True, help="model.h5 of a run")
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. model.onnx")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX operator set of the graph (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file (never the --model file)",
    )
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    from .api.model import load_model

    def export() -> str | None:
        if not comm.is_root:
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_model(args.model)
        for w in caught:  # a format-1 model: said once, as the other commands say it
            log.warning(str(w.message))
        out = model.to_onnx(args.out, force=args.force, opset=args.opset)
        outputs = "probabilities, labels" if model.is_classifier else "predictions"
        return (
            f"wrote {out}: {model.kind} ({model.task}), {model.n_features_in_} features -> "
            f"{outputs} (ONNX opset {args.opset})"
        )

    summary = agree(comm, export)
    if summary is not None:
        log.info(summary)
    return 0

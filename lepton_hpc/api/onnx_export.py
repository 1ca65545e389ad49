"""A trained model as an ONNX graph, for serving with onnxruntime or any ONNX runtime.

The graph computes, in float32, what ``lepton predict`` computes in float64:

    X (float32, N x n_features)
      -> Sub(shift) -> Div(scale)                       the training scaler (absent for "none")
      -> Gemm(W_l, b_l) -> Sigmoid | Tanh | Relu        each hidden layer
      -> Gemm(W_out, b_out)                             the output layer
      -> Sigmoid | Softmax | nothing                    binary, multi-class, regression head

Its outputs carry the names of the data sets ``lepton predict`` writes: ``probabilities``
(N x 1 for binary: the probability of class 1; N x k for softmax) and ``labels`` (int64, N: the
threshold 0.5 or the argmax, as ``metrics.predicted_labels``) for classifiers, ``predictions``
(N x outputs) for regressors. The scaler is kept as Sub then Div, not a multiplication by the
reciprocal, so each scaled feature is one rounding away from the toolkit's.

``onnx`` is optional (``pip install lepton_hpc[onnx]``): it is imported only here, only when an
export runs. The graph is checked with ``onnx.checker.check_model`` before anything is written,
and the file is written atomically (``safety.atomic_file``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LeptonError

# ``model`` below is a ``lepton_hpc.api.model.Model`` (not imported: that module imports this).
LoadedModel = Any

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "build_onnx", "export_onnx", "require_onnx"]

DEFAULT_OPSET = 17  # ONNX 1.12 (2022): read by every maintained runtime
MIN_OPSET = 13  # Softmax over one axis and GreaterOrEqual need 13 and 12
ONNX_MISSING = "ONNX export needs the onnx package: pip install lepton_hpc[onnx]"
ACTIVATION_OPS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}


def require_onnx() -> Any:
    """The ``onnx`` module, or one clear error saying how to install it."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise LeptonError(ONNX_MISSING) from None
    return onnx


def build_onnx(model: LoadedModel, opset: int = DEFAULT_OPSET) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (checked by ``onnx.checker``); nothing is written."""
    onnx = require_onnx()
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise LeptonError(f"--opset {opset}: this onnx writes opsets {MIN_OPSET} to {top}")
    h, nph, T = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(nph.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(h.make_node(op, inputs, [out], name=f"{op.lower()}_{len(nodes)}", **attrs))
        return out

    a = "X"
    scaler = model.scaler
    if scaler.kind != "none":
        a = node("Sub", [a, const("scaler_shift", scaler.shift.astype(np.float32))], "shifted")
        a = node("Div", [a, const("scaler_scale", scaler.scale.astype(np.float32))], "scaled")
    layers = model.layers()
    act = ACTIVATION_OPS[model.activation] if len(layers) > 1 else ""
    for i, (W, b) in enumerate(layers):
        w = const(f"W{i}", W.astype(np.float32))
        bias = const(f"b{i}", b.astype(np.float32))
        last = i == len(layers) - 1
        a = node("Gemm", [a, w, bias], "logits" if last else f"z{i}")
        if not last:
            a = node(act, [a], f"h{i}")

    k = model.n_outputs_
    rows = "N"
    if model.head == "squared":
        node("Identity", [a], "predictions")
        outputs = [h.make_tensor_value_info("predictions", T.FLOAT, [rows, k])]
    else:
        if model.head == "binary":
            p = node("Sigmoid", [a], "probabilities")
            half = const("threshold", np.array(0.5, dtype=np.float32))
            ge = node("GreaterOrEqual", [p, half], "is_class_1")
            ids = node("Cast", [ge], "label_column", to=T.INT64)
            node("Reshape", [ids, const("label_shape", np.array([-1], np.int64))], "labels")
        else:
            p = node("Softmax", [a], "probabilities", axis=1)
            node("ArgMax", [p], "labels", axis=1, keepdims=0)
        outputs = [
            h.make_tensor_value_info("probabilities", T.FLOAT, [rows, k]),
            h.make_tensor_value_info("labels", T.INT64, [rows]),
        ]
    graph = h.make_graph(
        nodes,
        f"lepton_{model.kind}",
        [h.make_tensor_value_info("X", T.FLOAT, [rows, model.n_features_in_])],
        outputs,
        initializer=inits,
        doc_string=_describe(model),
    )
    opsets = [h.make_opsetid("", opset)]
    proto = h.make_model(
        graph,
        opset_imports=opsets,
        producer_name="lepton_hpc",
        producer_version=_version(),
        ir_version=h.find_min_ir_version_for(opsets),
    )
    h.set_model_props(proto, _props(model))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise LeptonError(f"the ONNX graph of '{model.path}' fails onnx's checker: {exc}") from None
    return proto


def export_onnx(
    model: LoadedModel, path: str | os.PathLike, *, force: bool = False, opset: int = DEFAULT_OPSET
) -> Path:
    """Write ``model`` to ``path`` as ONNX, atomically; returns the path.

    As every ``--out`` of the toolkit: an existing file is replaced only with ``force``, and the
    model file itself never, whatever ``force`` says. Everything is checked and the graph built
    before the file is created, so a refusal leaves nothing behind.
    """
    from ..data.h5 import check_writable
    from ..safety import atomic_file, check_not_input

    out = Path(os.fspath(path))
    check_not_input(out, {"model": model.path}, "--out")
    check_writable(out, force=force)
    data = build_onnx(model, opset).SerializeToString()
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return out


def _version() -> str:
    from .. import __version__

    return __version__


def _describe(model: LoadedModel) -> str:
    outs = "probabilities (float32) and labels (int64)" if model.is_classifier else "predictions"
    return (
        f"lepton_hpc {model.kind} ({model.task}) from '{model.path.name}': input X float32 "
        f"[N, {model.n_features_in_}] unscaled features; outputs {outs}, as lepton predict "
        "writes them"
    )


def _props(model: LoadedModel) -> dict[str, str]:
    """Provenance in the file's metadata: what the model is and which model.h5 it came from."""
    try:
        digest = hashlib.sha256(model.path.read_bytes()).hexdigest()
    except OSError:  # moved or removed since it was loaded: the graph is still the model's
        digest = ""
    return {
        "lepton_kind": model.kind,
        "lepton_task": model.task,
        "lepton_sizes": ",".join(map(str, model.sizes)),
        "lepton_activation": model.activation or "",
        "lepton_scaler": model.scaler.kind,
        "lepton_model_file": model.path.name,
        "lepton_model_file_sha256": digest,
    }

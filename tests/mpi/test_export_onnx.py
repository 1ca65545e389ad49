"""``lepton export`` and ``Model.to_onnx``: onnxruntime on the exported graph gives what
``lepton predict`` wrote, for every model kind; the command runs alone and under mpiexec; its
refusals are one line, exit 2, and leave every file as it was.

The models come from ``tests/unit/api_zoo.py`` (trained once per session by the real CLI).
"""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lepton_hpc.api import onnx_export
from lepton_hpc.api.model import load_model
from lepton_hpc.errors import LeptonError
from tests.conftest import ROOT, lepton, ok
from tests.unit.api_zoo import MODELS, data_file, zoo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NAMES = list(MODELS)
BY_MPIEXEC, ALONE = "mlp_tanh", "softmax"  # exported by the command; the rest through the API


def lepton_alone(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m lepton_hpc ARGS`` without mpiexec (and without any MPI launcher variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    return subprocess.run(
        [sys.executable, "-m", "lepton_hpc", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    files = {name: out / f"{name}.onnx" for name in NAMES}
    for name in NAMES:
        model = root / name / "model.h5"
        if name == BY_MPIEXEC:
            res = ok(lepton(2, "export", "--model", model, "--out", files[name], timeout=120))
            assert res.stdout.count("wrote") == 1  # rank 0 writes and speaks
        elif name == ALONE:
            res = lepton_alone("export", "--model", model, "--out", files[name])
            assert res.returncode == 0, res.stderr
        else:
            assert load_model(model).to_onnx(files[name]) == files[name]
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in files.values())
    return files


def cli_outputs(root, name):
    with h5py.File(root / f"{name}.pred.h5", "r") as fh:
        if "probabilities" in fh:
            return {"probabilities": fh["probabilities"][()], "labels": fh["labels"][()]}
        return {"predictions": fh["predictions"][()]}


@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_equals_lepton_predict(root, exported, name):
    with h5py.File(data_file(root, name), "r") as fh:
        X = fh["X"][()]
    sess = ort.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("X", "tensor(float)", X.shape[1])
    want = cli_outputs(root, name)
    names = [o.name for o in sess.get_outputs()]
    assert sorted(names) == sorted(want)
    got = dict(zip(names, sess.run(None, {"X": X.astype(np.float32)}), strict=True))
    for key, value in want.items():
        assert got[key].shape == value.shape
        if key == "labels":
            assert got[key].dtype == np.int64 and np.array_equal(got[key], value)
        else:
            assert got[key].dtype == np.float32
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_graph_is_scaler_then_dense_layers_then_head(root, exported, name):
    proto = onnx.load(str(exported[name]))
    onnx.checker.check_model(proto, full_check=True)
    m = load_model(root / name / "model.h5")
    ops = [n.op_type for n in proto.graph.node]
    scaled = m.scaler.kind != "none"
    if scaled:
        assert ops[:2] == ["Sub", "Div"] and "Mul" not in ops
    else:
        assert "Sub" not in ops and "Div" not in ops
    assert ops.count("Gemm") == len(m.sizes) - 1
    if m.activation:
        act = {"tanh": "Tanh", "relu": "Relu", "sigmoid": "Sigmoid"}[m.activation]
        assert ops.count(act) >= len(m.hidden)
    head = {"squared": "Identity", "binary": "Sigmoid", "softmax": "Softmax"}[m.head]
    assert head in ops[ops.index("Gemm") :]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    if scaled:  # the stored statistics, rounded to float32 once
        assert np.array_equal(inits["scaler_shift"], m.scaler.shift.astype(np.float32))
        assert np.array_equal(inits["scaler_scale"], m.scaler.scale.astype(np.float32))
    for i, (W, b) in enumerate(m.layers()):
        assert np.array_equal(inits[f"W{i}"], W.astype(np.float32))
        assert np.array_equal(inits[f"b{i}"], b.astype(np.float32))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["lepton_kind"] == m.kind and props["lepton_task"] == m.task
    assert proto.producer_name == "lepton_hpc"
    assert proto.opset_import[0].version == onnx_export.DEFAULT_OPSET


def test_opset_choice_and_default_agree(root, tmp_path):
    from lepton_hpc import export_cmd

    assert export_cmd.DEFAULT_OPSET == onnx_export.DEFAULT_OPSET
    m = load_model(root / "mlp_sigmoid" / "model.h5")
    out = m.to_onnx(tmp_path / "old.onnx", opset=onnx_export.MIN_OPSET)
    assert onnx.load(str(out)).opset_import[0].version == onnx_export.MIN_OPSET
    with h5py.File(data_file(root, "mlp_sigmoid"), "r") as fh:
        X = fh["X"][()]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    labels = sess.run(["labels"], {"X": X})[0]
    assert np.array_equal(labels, cli_outputs(root, "mlp_sigmoid")["labels"])
    with pytest.raises(LeptonError, match="--opset 5: this onnx writes opsets 13 to"):
        m.to_onnx(tmp_path / "bad.onnx", opset=5)
    assert not (tmp_path / "bad.onnx").exists()


def test_api_refuses_the_model_and_an_existing_file(root, tmp_path):
    src = root / "linear" / "model.h5"
    model = tmp_path / "model.h5"
    model.write_bytes(src.read_bytes())
    m = load_model(model)
    before = model.read_bytes()
    with pytest.raises(LeptonError, match="refusing to overwrite an input"):
        m.to_onnx(model, force=True)
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    with pytest.raises(LeptonError, match="refusing to overwrite an input"):
        m.to_onnx(link, force=True)
    assert model.read_bytes() == before
    mine = tmp_path / "mine.onnx"
    mine.write_text("the user's file\n")
    with pytest.raises(LeptonError, match="exists; pass --force to replace it"):
        m.to_onnx(mine)
    assert mine.read_text() == "the user's file\n"
    m.to_onnx(mine, force=True)
    onnx.checker.check_model(onnx.load(str(mine)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "mine.onnx", "model.h5"]


def test_cli_errors_are_one_line_exit_2_and_touch_nothing(root, tmp_path):
    model = tmp_path / "model.h5"
    model.write_bytes((root / "logistic" / "model.h5").read_bytes())
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(model.read_bytes())
    with h5py.File(damaged, "r+") as fh:
        fh["params"][1] *= 2.0
    mine = tmp_path / "mine.onnx"
    mine.write_text("keep me\n")
    cases = [
        (["--model", tmp_path / "none.h5", "--out", tmp_path / "a.onnx"], "does not exist"),
        (["--model", damaged, "--out", tmp_path / "a.onnx"], "fails its checksum"),
        (["--model", model, "--out", model, "--force"], "refusing to overwrite an input"),
        (["--model", model, "--out", mine], "exists; pass --force to replace it"),
    ]
    for args, needle in cases:
        res = lepton_alone("export", *args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lepton: error:") and needle in lines[0]
        assert "Traceback" not in res.stderr
    # under mpiexec the refusal is printed once, and every rank exits 2
    res = lepton(2, "export", "--model", model, "--out", model, "--force")
    assert res.returncode == 2
    assert res.stderr.count("refusing to overwrite an input") == 1
    assert mine.read_text() == "keep me\n"
    assert model.read_bytes() == (root / "logistic" / "model.h5").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.h5", "mine.onnx", "model.h5"]

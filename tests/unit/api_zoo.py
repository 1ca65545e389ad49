"""Small real models of every kind, trained, predicted and evaluated by the real command line.

``zoo(tmp_path_factory)`` builds once per test session (the in-process API tests and the ONNX
export tests share it): one ``mpiexec -n 1`` process runs ``lepton datagen``, ``lepton train``,
``lepton predict`` and ``lepton evaluate --json`` through ``lepton_hpc.cli.main`` one after
the other, so the interpreter and Numba start once instead of once per command.

Layout of the zoo directory: ``<data>.h5`` training files and ``<data>_test.h5`` test files
(rows after the training rows of the same stream); for each model NAME a run directory
``NAME/`` with ``model.h5``, its predictions of the test file ``NAME.pred.h5`` and its metrics
``NAME.eval.json``; ``MODELS[NAME]["extra"]`` lists other test files (float64, int16 and 1-D
features) predicted into ``NAME.<tag>.pred.h5``. ``lin2`` is ``lin`` with two targets per row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import ok, run_mpi

DATA = {  # name: (datagen task, features, classes)
    "lin": ("linear", 4, 0),
    "lin1": ("linear", 1, 0),
    "log": ("logistic", 5, 0),
    "blobs": ("blobs", 3, 3),
}
TRAIN_ROWS, TEST_ROWS = 240, 90

MODELS = {  # name: data, [model] section, scaler, extra test files (tag: how X is stored)
    "linear": {"data": "lin", "model": {"kind": "linear"}, "scale": "zscore"},
    "linear1": {"data": "lin1", "model": {"kind": "linear"}, "scale": "minmax", "extra": ["flat"]},
    "logistic": {
        "data": "log",
        "model": {"kind": "logistic"},
        "scale": "minmax",
        "extra": ["f64", "i16"],
    },
    "linear2": {"data": "lin2", "model": {"kind": "linear"}, "scale": "zscore"},
    "softmax": {"data": "blobs", "model": {"kind": "softmax"}, "scale": "none"},
    "mlp_tanh": {
        "data": "log",
        "model": {"kind": "mlp", "hidden": [6, 4], "activation": "tanh"},
        "scale": "zscore",
    },
    "mlp_relu": {
        "data": "lin",
        "model": {"kind": "mlp", "hidden": [5], "activation": "relu"},
        "scale": "zscore",
    },
    "mlp_sigmoid": {
        "data": "blobs",
        "model": {"kind": "mlp", "hidden": [5], "activation": "sigmoid"},
        "scale": "minmax",
    },
}

SCRIPT = r"""
import json, sys
import h5py, numpy as np
from lepton_hpc.cli import main

spec = json.loads(sys.argv[1])
root = spec["root"]

def run(*args):
    rc = main([str(a) for a in args])
    if rc != 0:
        sys.exit(f"lepton {' '.join(map(str, args))}: exit {rc}")

for name, (task, d, k) in spec["data"].items():
    for tag, start, rows in (("", 0, spec["train"]), ("_test", spec["train"], spec["test"])):
        run("datagen", "--task", task, "--rows", rows, "--features", d, "--seed", 5,
            "--classes", max(k, 2), "--start-row", start, "--out", f"{root}/{name}{tag}.h5")
with h5py.File(f"{root}/log_test.h5") as fh:  # other stored feature types, same rows
    X, y = fh["X"][()], fh["y"][()]
for tag, Xs in (("f64", X.astype(np.float64) * 3.0), ("i16", np.round(X * 10).astype(np.int16))):
    with h5py.File(f"{root}/log_test.{tag}.h5", "w") as fh:
        fh["X"], fh["y"] = Xs, y
with h5py.File(f"{root}/lin1_test.h5") as fh, h5py.File(f"{root}/lin1_test.flat.h5", "w") as out:
    out["X"], out["y"] = fh["X"][:, 0], fh["y"][()]  # 1-D features: one feature
for tag in ("", "_test"):  # two regression targets per row
    with h5py.File(f"{root}/lin{tag}.h5") as fh, h5py.File(f"{root}/lin2{tag}.h5", "w") as out:
        out["X"], out["y"] = fh["X"][()], np.column_stack([fh["y"][()], 1.0 - 2.0 * fh["y"][()]])

for name, m in spec["models"].items():
    cfg = f"{root}/{name}.toml"
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in m["model"].items())
    with open(cfg, "w") as fh:
        fh.write(
            f'[data]\ntrain = "{root}/{m["data"]}.h5"\nscale = "{m["scale"]}"\n'
            f"[model]\n{model}\n"
            '[optim]\nname = "adam"\nlr = 0.05\n'
            "[train]\nepochs = 3\nbatch_size = 40\nseed = 1\n"
            f'[output]\ndir = "{root}/{name}"\nplot = false\n'
        )
    run("train", cfg)
    mf = f"{root}/{name}/model.h5"
    test = f"{root}/{m['data']}_test.h5"
    run("predict", "--model", mf, "--data", test, "--out", f"{root}/{name}.pred.h5")
    run("evaluate", "--model", mf, "--data", test, "--json", f"{root}/{name}.eval.json")
    for tag in m.get("extra", []):
        data = f"{root}/{m['data']}_test.{tag}.h5"
        run("predict", "--model", mf, "--data", data, "--out", f"{root}/{name}.{tag}.pred.h5")
        run("evaluate", "--model", mf, "--data", data, "--json", f"{root}/{name}.{tag}.eval.json")
"""


def zoo(tmp_path_factory) -> Path:
    """The zoo directory, built on first use in this session (see the module docstring)."""
    root = tmp_path_factory.getbasetemp() / "api_zoo"
    if (root / "done").exists():
        return root
    building = root.with_name(f"api_zoo.{os.getpid()}.tmp")
    building.mkdir()
    spec = {
        "root": str(building),
        "data": DATA,
        "models": MODELS,
        "train": TRAIN_ROWS,
        "test": TEST_ROWS,
    }
    ok(run_mpi(1, ["-c", SCRIPT, json.dumps(spec)], timeout=240))
    # run directories record their paths; the zoo is only read under its final name
    building.rename(root)
    (root / "done").write_text("")
    return root


def data_file(root: Path, name: str, tag: str = "") -> Path:
    """The test file model ``name`` predicted (``tag``: one of its extra stored types)."""
    data = MODELS[name]["data"]
    return root / (f"{data}_test.{tag}.h5" if tag else f"{data}_test.h5")

"""Train, evaluate and export a model from Python, as `lepton train` / `evaluate` / `export` do.

    python examples/quickstart.py [FOLDER]      # FOLDER defaults to runs/quickstart

It writes a small synthetic data set (your own HDF5 file goes in its place), trains a logistic
regression with L-BFGS, prints the test metrics and writes model.onnx (`pip install
lepton_hpc[onnx]` for the export).
"""

import sys
from pathlib import Path

import h5py
import numpy as np

import lepton_hpc as lp

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
X = rng.normal(size=(25_000, 16)).astype(np.float32)
y = (X @ rng.normal(size=16) + rng.normal(size=25_000) > 0).astype(np.float32)
for name, rows in (("train", slice(0, 20_000)), ("test", slice(20_000, None))):
    with h5py.File(folder / f"{name}.h5", "w") as fh:
        fh["X"], fh["y"] = X[rows], y[rows]

# --- the ten lines a user writes --------------------------------------------------------------
config = {
    "data": {"train": str(folder / "train.h5"), "scale": "zscore"},
    "model": {"kind": "logistic", "l2": 1e-4},
    "optim": {"name": "lbfgs"},
    "train": {"epochs": 30},
    "output": {"dir": str(folder / "run"), "plot": False},
}
run = lp.train(config, overwrite=True)
print("test metrics:", run.model.evaluate(folder / "test.h5"))
run.model.to_onnx(folder / "model.onnx", force=True)

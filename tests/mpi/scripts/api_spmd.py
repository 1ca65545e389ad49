"""SPMD estimator fits: each rank passes its own uneven block of one data set (rank 1 of 3 none).

Usage: api_spmd.py OUT.npz. Every rank fits every case; the script checks that all ranks hold
the same parameters (bitwise) and rank 0 saves them, with predictions on all rows, to OUT.npz.
"""

from __future__ import annotations

import sys

import numpy as np

from lepton_hpc.api import estimators as est_api
from lepton_hpc.comm import world

CUTS = {1: [0.0, 1.0], 2: [0.0, 0.7, 1.0], 3: [0.0, 0.2, 0.2, 1.0]}  # rank 1 of 3: no rows


def data(n: int = 700, d: int = 6):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(n, d)) * np.linspace(0.5, 3.0, d) + 1.0
    w = rng.normal(size=d)
    t = X @ w + 0.3 * rng.normal(size=n)
    labels = np.array(["ant", "bee", "cat"])[np.digitize(t, np.quantile(t, [1 / 3, 2 / 3]))]
    binary = np.where(t > np.median(t), "yes", "no")
    return X, t, labels, binary


CASES = {
    "linear": (est_api.LinearRegression, {"scale": "zscore"}, "t"),
    "linear_adam": (
        est_api.LinearRegression,
        {
            "optimizer": "adam",
            "lr": 0.05,
            "batch_size": 64,
            "epochs": 5,
            "validation_fraction": 0.2,
        },
        "t",
    ),
    "logistic": (est_api.LogisticRegression, {"scale": "zscore", "epochs": 30}, "binary"),
    "softmax": (est_api.SoftmaxRegression, {"scale": "minmax", "epochs": 30}, "labels"),
    "mlp_clf": (
        est_api.MLPClassifier,
        {"hidden": (8,), "batch_size": 50, "epochs": 4, "scale": "zscore", "activation": "tanh"},
        "labels",
    ),
    "mlp_reg": (
        est_api.MLPRegressor,
        {"hidden": (8, 4), "batch_size": 100, "epochs": 4, "scale": "zscore"},
        "t",
    ),
}


def main() -> None:
    comm = world()
    X, t, labels, binary = data()
    targets = {"t": t, "labels": labels, "binary": binary}
    n = X.shape[0]
    cut = [round(c * n) for c in CUTS[comm.size]]
    lo, hi = cut[comm.rank], cut[comm.rank + 1]
    saved = {}
    for reproducible in (False, True):
        for name, (cls, params, target) in CASES.items():
            est = cls(reproducible=reproducible, **params)
            est.fit(X[lo:hi], targets[target][lo:hi])
            every = comm.allgather(est.params_)
            assert all(np.array_equal(p, est.params_) for p in every), f"{name}: ranks differ"
            key = f"{name}_{'repro' if reproducible else 'plain'}"
            saved[key] = est.params_
            saved[key + "_loss"] = np.asarray(est.loss_curve_)
            if hasattr(est, "classes_"):
                assert list(est.classes_) == sorted(set(targets[target])), est.classes_
                saved[key + "_pred"] = est.predict_proba(X)
            else:
                saved[key + "_pred"] = est.predict(X)
    bad = X[lo:hi].copy()
    if comm.rank == comm.size - 1:  # one rank's bad rows: every rank raises, none waits
        bad[0, 0] = np.nan
    try:
        est_api.LinearRegression().fit(bad, t[lo:hi])
    except ValueError as exc:
        print(f"rank {comm.rank}: caught ValueError: {str(exc)[:60]}", flush=True)
    if comm.rank == 0:
        np.savez(sys.argv[1], **saved)
        print("api_spmd: ok", comm.size)


if __name__ == "__main__":
    main()

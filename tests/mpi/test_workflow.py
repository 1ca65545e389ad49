"""The user's workflow under real MPI: own data in, trained and evaluated models, predictions out.

Real data shipped with scikit-learn (breast cancer, digits, diabetes) on a fixed train/test split:
our logistic regression, MLP and linear regression against scikit-learn's on 1, 2 and 3 ranks;
metrics identical across rank counts and equal to scikit-learn's on the same arrays; predictions
identical across rank counts; ``lepton convert`` round trips, streaming and errors; the model's
checks on features and labels; early stopping.
"""

import json
import math

import h5py
import numpy as np
import pytest

from tests.conftest import lepton, ok, run_mpi, write_config, write_h5
from tests.reference import forward

RANKS = [1, 2, 3]


# ---- real data, scikit-learn references and our runs ----------------------------------------
# Each case: data set, our config, and the scikit-learn estimator it is measured against. The
# convex models have the same objective as scikit-learn's (l2 = 1 / (C n) for C = 1), so they
# reach the same optimum; the MLP is measured on test accuracy only.
CASES = {
    "breast_cancer-logistic": {
        "model": {"kind": "logistic", "l2": "1/n"},
        "optim": {"name": "lbfgs", "lr": 1.0},
        "train": {"epochs": 100, "batch_size": 0},
    },
    "digits-mlp": {
        "model": {"kind": "mlp", "hidden": [100], "activation": "relu", "l2": 1e-3},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 50, "batch_size": 100, "seed": 2},
    },
    "diabetes-linear": {
        "model": {"kind": "linear"},
        "optim": {"name": "lbfgs", "lr": 1.0},
        "train": {"epochs": 100, "batch_size": 0},
    },
}


def sklearn_split(name: str):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    stratify = None if name == "diabetes" else y
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=stratify)


def sklearn_quality(case: str, Xtr, Xte, ytr, yte) -> float:
    """scikit-learn's test accuracy (classifiers) or MSE (regression) on the split."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.metrics import accuracy_score, mean_squared_error
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if case == "breast_cancer-logistic":
        est = make_pipeline(StandardScaler(), LogisticRegression())
    elif case == "digits-mlp":
        est = make_pipeline(StandardScaler(), MLPClassifier(random_state=0))
    else:
        est = LinearRegression()
    pred = est.fit(Xtr, ytr).predict(Xte)
    if case == "diabetes-linear":
        return float(mean_squared_error(yte, pred))
    return float(accuracy_score(yte, pred))


class Workflow:
    """Lazily written data files, scikit-learn references and training runs, shared by tests."""

    def __init__(self, root) -> None:
        self.root = root
        self.splits: dict = {}
        self.refs: dict = {}
        self.runs: dict = {}

    def files(self, case: str):
        if case not in self.splits:
            name = case.split("-", maxsplit=1)[0]
            Xtr, Xte, ytr, yte = sklearn_split(name)
            train = write_h5(self.root / f"{name}_train.h5", Xtr, ytr.astype(np.float64))
            test = write_h5(self.root / f"{name}_test.h5", Xte, yte.astype(np.float64))
            self.splits[case] = (train, test, Xtr, Xte, ytr, yte)
        return self.splits[case]

    def reference(self, case: str) -> float:
        if case not in self.refs:
            _, _, *arrays = self.files(case)
            self.refs[case] = sklearn_quality(case, *arrays)
        return self.refs[case]

    def run(self, case: str, ranks: int):
        """The run directory of ``case`` trained on ``ranks`` ranks (trained once)."""
        if (case, ranks) not in self.runs:
            train, test, Xtr, *_ = self.files(case)
            sections = {k: dict(v) for k, v in CASES[case].items()}
            if sections["model"].get("l2") == "1/n":
                sections["model"]["l2"] = 1.0 / len(Xtr)
            out = self.root / f"run-{case}-{ranks}"
            sections["data"] = {"train": str(train), "test": str(test), "scale": "zscore"}
            sections["output"] = {"dir": str(out), "plot": False}
            cfg = write_config(self.root / f"{case}-{ranks}.toml", sections)
            ok(lepton(ranks, "train", cfg, timeout=240))
            self.runs[case, ranks] = out
        return self.runs[case, ranks]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return Workflow(tmp_path_factory.mktemp("workflow"))


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", list(CASES))
def test_quality_matches_scikit_learn_on_real_data(work, case, ranks):
    run = work.run(case, ranks)
    test = json.loads((run / "results.json").read_text())["metrics"]["test"]
    ref = work.reference(case)
    if case == "diabetes-linear":
        assert test["mse"] <= 1.02 * ref, (test["mse"], ref)
    else:
        assert test["accuracy"] >= ref - 0.01, (test["accuracy"], ref)
    print(f"{case} on {ranks} rank(s): ours {test}, scikit-learn {ref}")


def read_predictions(path):
    with h5py.File(path) as fh:
        return {name: fh[name][()] for name in fh}


@pytest.mark.parametrize("case", list(CASES))
def test_metrics_identical_across_ranks_and_equal_to_scikit_learn(work, case, tmp_path):
    from sklearn import metrics as skm

    model = work.run(case, 1) / "model.h5"
    _, test, *_ = work.files(case)
    found = []
    for n in RANKS:
        out = tmp_path / f"metrics{n}.json"
        ok(lepton(n, "evaluate", "--model", model, "--data", test, "--json", out))
        found.append(json.loads(out.read_text())["metrics"])
    assert found[0] == found[1] == found[2]  # the same bits: counts and exact sums
    m = found[0]

    pred_file = tmp_path / "pred.h5"
    ok(lepton(1, "predict", "--model", model, "--data", test, "--out", pred_file))
    pred = read_predictions(pred_file)
    with h5py.File(test) as fh:
        y = fh["y"][()]
    # Float formulas differ from scikit-learn's in the order of operations: equal to rounding.
    same = {"rel": 1e-12, "abs": 1e-15}
    if case == "diabetes-linear":
        p = pred["predictions"][:, 0]
        assert m["rows"] == y.size
        assert m["mse"] == pytest.approx(skm.mean_squared_error(y, p), **same)
        assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, p), **same)
        assert m["r2"] == pytest.approx(skm.r2_score(y, p), **same)
        assert m["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)), **same)
        return
    labels, probs = pred["labels"], pred["probabilities"]
    average = "binary" if case.startswith("breast_cancer") else "macro"
    k = 2 if average == "binary" else 10
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, labels), **same)
    assert m["precision"] == pytest.approx(skm.precision_score(y, labels, average=average), **same)
    assert m["recall"] == pytest.approx(skm.recall_score(y, labels, average=average), **same)
    assert m["f1"] == pytest.approx(skm.f1_score(y, labels, average=average), **same)
    assert m["confusion"] == skm.confusion_matrix(y, labels, labels=range(k)).tolist()
    sk_probs = np.c_[1 - probs[:, 0], probs[:, 0]] if k == 2 else probs
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, sk_probs, labels=range(k)), rel=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_predict_under_3_ranks_writes_the_file_1_rank_writes(work, case, tmp_path):
    model = work.run(case, 1) / "model.h5"
    _, test, _, Xte, *_ = work.files(case)
    files = []
    for n in (1, 3):
        out = tmp_path / f"pred{n}.h5"
        ok(lepton(n, "predict", "--model", model, "--data", test, "--out", out))
        files.append(out)
    one, three = (read_predictions(f) for f in files)
    assert (
        sorted(one)
        == sorted(three)
        == (["predictions"] if case == "diabetes-linear" else ["labels", "probabilities"])
    )
    for name in one:
        assert one[name].dtype == three[name].dtype and one[name].shape == three[name].shape
        assert one[name].tobytes() == three[name].tobytes(), name
    # ... and it is the model applied to the input rows, in the input's order
    with h5py.File(model) as fh:
        params, sizes = fh["params"][()], fh.attrs["sizes"]
        shift, scale = fh["scaler/shift"][()], fh["scaler/scale"][()]
        act = {"sigmoid": 0, "tanh": 1, "relu": 2}[fh.attrs["activation"]]
        head = {"squared": 0, "binary": 1, "softmax": 2}[fh.attrs["head"]]
    want, _ = forward((Xte - shift) / scale, params, sizes, act, head)
    got = one["predictions" if head == 0 else "probabilities"]
    assert got.shape == (len(Xte), sizes[-1])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# ---- lepton convert ------------------------------------------------------------------------
def table(n=1003, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.float64)


def write_csv(path, X, y, header=True, names=None):
    names = names or [f"f{j}" for j in range(X.shape[1])] + ["label"]
    lines = [",".join(names)] if header else []
    lines += [",".join(map(repr, [*row.tolist(), float(t)])) for row, t in zip(X, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_h5(path, x="X", y="y"):
    with h5py.File(path) as fh:
        return fh[x][()], (fh[y][()] if y in fh else None), fh[x].chunks, dict(fh.attrs)


def test_convert_csv_round_trips_and_trains(tmp_path):
    X, y = table()
    src = write_csv(tmp_path / "data.csv", X, y)
    out = tmp_path / "data.h5"
    res = ok(lepton(3, "convert", src, "--out", out, "--chunk-rows", 100))
    assert res.stdout.count("wrote") == 1 and "1003 rows x 4 features" in res.stdout
    Xh, yh, chunks, attrs = read_h5(out)
    assert Xh.dtype == np.float64 and yh.dtype == np.float64
    assert np.array_equal(Xh, X) and np.array_equal(yh, y)  # repr() round trips exactly
    assert chunks == (100, 4) and list(attrs["columns"]) == ["f0", "f1", "f2", "f3"]
    # the target by name, a header-less file, and names for the data sets
    ok(lepton(1, "convert", src, "--out", tmp_path / "f1.h5", "--target-column", "f1"))
    Xh, yh, _, _ = read_h5(tmp_path / "f1.h5")
    assert np.array_equal(yh, X[:, 1]) and np.array_equal(Xh, np.c_[X[:, [0, 2, 3]], y])
    bare = write_csv(tmp_path / "bare.csv", X, y, header=False)
    ok(lepton(1, "convert", bare, "--out", tmp_path / "bare.h5", "--x", "feat", "--y", "t"))
    Xh, yh, _, _ = read_h5(tmp_path / "bare.h5", "feat", "t")
    assert np.array_equal(Xh, X) and np.array_equal(yh, y)
    # the converted file is ordinary training data
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "data": {"train": str(out), "scale": "zscore"},
            "model": {"kind": "logistic"},
            "optim": {"name": "lbfgs"},
            "train": {"epochs": 20},
            "output": {"dir": str(tmp_path / "run"), "plot": False},
        },
    )
    ok(lepton(2, "train", cfg))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["train"]["accuracy"] > 0.95


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_convert_npy_round_trips(tmp_path, dtype):
    X, y = table()
    data = np.c_[X * 100, y].astype(dtype)
    src = tmp_path / "data.npy"
    np.save(src, data)
    out = tmp_path / "data.h5"
    ok(lepton(2, "convert", src, "--out", out, "--chunk-rows", 64))
    Xh, yh, chunks, _ = read_h5(out)
    assert Xh.dtype == (np.float32 if dtype == np.float32 else np.float64)
    assert np.array_equal(Xh, data[:, :-1]) and yh.dtype == np.float64
    assert np.array_equal(yh, data[:, -1]) and chunks == (64, 4)
    # --no-target keeps every column as a feature (a file to predict on)
    ok(lepton(1, "convert", src, "--out", tmp_path / "all.h5", "--no-target"))
    Xh, yh, _, _ = read_h5(tmp_path / "all.h5")
    assert yh is None and np.array_equal(Xh, data)


@pytest.mark.parametrize("how", ["savez", "savez_compressed", "fortran"])
def test_convert_npz_round_trips(tmp_path, how):
    X, y = table()
    X32 = X.astype(np.float32)
    src = tmp_path / "data.npz"
    if how == "fortran":  # stored uncompressed: memory-mapped in Fortran order
        np.savez(src, features=np.asfortranarray(X32), target=y[:, None])
    else:
        getattr(np, how)(src, features=X32, target=y[:, None])
    out = tmp_path / "data.h5"
    args = ["--x", "features", "--y", "target", "--chunk-rows", 50]
    ok(lepton(2, "convert", src, "--out", out, *args))
    Xh, yh, chunks, _ = read_h5(out, "features", "target")
    assert Xh.dtype == np.float32 and np.array_equal(Xh, X32) and chunks == (50, 4)
    assert yh.shape == (1003, 1) and np.array_equal(yh[:, 0], y)


# Run in the converting process itself, under mpiexec -n 1: the peak of the Python heap (NumPy's
# buffers included) while converting, and how many chunks the data sets were written in.
PEAK_CODE = """
import sys, tracemalloc, h5py
from lepton_hpc.data.convert import Options, convert_file
src, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
tracemalloc.start()
convert_file(src, out, Options(chunk_rows=rows))
peak = tracemalloc.get_traced_memory()[1]
with h5py.File(out) as fh:
    print(peak, fh["X"].id.get_num_chunks(), fh["X"].chunks[0], fh["X"].shape[0])
"""


@pytest.mark.parametrize("fmt", ["csv", "npy", "npz"])
def test_convert_streams_in_chunks(tmp_path, fmt):
    n, d, rows = 100_000, 8, 500
    X, y = table(n, d, seed=3)
    full_bytes = X.nbytes + y.nbytes  # 7.2 MB as float64, 17 MB as CSV text
    src = tmp_path / f"big.{fmt}"
    if fmt == "csv":
        write_csv(src, X, y)
    elif fmt == "npy":
        np.save(src, np.c_[X, y])
    else:
        np.savez_compressed(src, X=X, y=y)
    out = tmp_path / "big.h5"
    res = ok(run_mpi(1, ["-c", PEAK_CODE, str(src), str(out), str(rows)], timeout=240))
    peak, n_chunks, chunk_rows, n_rows = map(int, res.stdout.split())
    assert (n_rows, chunk_rows, n_chunks) == (n, rows, n // rows)
    # Memory follows the chunk, not the file: the peak is a few chunks' worth (the strings of
    # one CSV chunk take ~0.6 MB for its 36 KB of numbers), never the whole file.
    assert peak < full_bytes / 4, (peak, full_bytes)
    Xh, yh, _, _ = read_h5(out)
    assert np.array_equal(Xh, X) and np.array_equal(yh, y)


def check_error(res, *needles, out=None):
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("lepton: error") == 1, res.stderr  # printed once, by rank 0
    for needle in needles:
        assert needle in res.stderr, res.stderr
    if out is not None:  # nothing written, not even the temporary file
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_convert_errors_name_the_file_row_and_column(tmp_path):
    X, y = table(40, 3)
    names = ["height", "weight", "age", "label"]
    src = write_csv(tmp_path / "people.csv", X, y, names=names)
    lines = src.read_text().splitlines()
    cells = lines[18].split(",")  # data row 17 (line 19 of the file)
    cells[2] = "forty"
    lines[18] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.h5"
    check_error(
        lepton(2, "convert", bad, "--out", out, "--chunk-rows", 8),
        f"'{bad}' row 17 (line 19), column 'age': 'forty' is not a number",
        out=out,
    )
    cells[2] = ""
    lines[18] = ",".join(cells)
    bad.write_text("\n".join(lines) + "\n")
    check_error(
        lepton(2, "convert", bad, "--out", out),
        f"'{bad}' row 17 (line 19), column 'age': the cell is empty",
        out=out,
    )
    ok(lepton(1, "convert", bad, "--out", out, "--missing", "nan"))
    Xh, _, _, _ = read_h5(out)
    assert np.isnan(Xh[17, 2]) and np.isfinite(np.delete(Xh, 17, axis=0)).all()
    out.unlink()
    short = tmp_path / "short.csv"
    short.write_text("\n".join([*lines[:5], "1,2", *lines[6:]]) + "\n")
    check_error(
        lepton(2, "convert", short, "--out", out),
        f"'{short}' row 4 (line 6) has 2 cells, but the header has 4",
        out=out,
    )
    check_error(
        lepton(2, "convert", src, "--out", out, "--target-column", "bmi"),
        "no column 'bmi'",
        "'height', 'weight', 'age', 'label'",
        out=out,
    )
    npz = tmp_path / "d.npz"
    np.savez(npz, X=X, labels=y)
    check_error(
        lepton(2, "convert", npz, "--out", out),
        f"'{npz}' has no member 'y' (has: X, labels)",
        out=out,
    )
    np.save(tmp_path / "flat.npy", y)
    check_error(
        lepton(1, "convert", tmp_path / "flat.npy", "--out", out),
        "must be 2-D",
        out=out,
    )
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    check_error(
        lepton(1, "convert", tmp_path / "text.npy", "--out", out),
        "is not a real number type",
        out=out,
    )
    truncated = tmp_path / "cut.npz"
    np.savez_compressed(truncated, X=np.zeros((4000, 3)), y=np.zeros(4000))
    truncated.write_bytes(truncated.read_bytes()[:-300])
    res = lepton(1, "convert", truncated, "--out", out)
    check_error(res, f"'{truncated}'", out=out)
    check_error(
        lepton(1, "convert", tmp_path / "none.csv", "--out", out),
        f"input file '{tmp_path / 'none.csv'}' does not exist",
        out=out,
    )
    check_error(
        lepton(1, "convert", tmp_path / "d.parquet", "--out", out),
        "does not exist",
        out=out,
    )
    (tmp_path / "d.xlsx").write_bytes(b"PK\x03\x04")
    check_error(
        lepton(1, "convert", tmp_path / "d.xlsx", "--out", out),
        "unknown format '.xlsx'",
        out=out,
    )
    out.write_bytes(b"keep me")
    check_error(lepton(2, "convert", src, "--out", out), f"output '{out}' exists", "--force")
    assert out.read_bytes() == b"keep me"
    ok(lepton(2, "convert", src, "--out", out, "--force"))
    assert read_h5(out)[0].shape == (40, 3)


# ---- the model's checks, early stopping ----------------------------------------------------
def small_config(tmp_path, data_file, name="run", **sections):
    base = {
        "data": {"train": str(data_file), "scale": "zscore"},
        "model": {"kind": "logistic"},
        "optim": {"name": "lbfgs"},
        "train": {"epochs": 10},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / f"{name}.toml", base)


def test_model_refuses_other_feature_counts_and_foreign_labels(tmp_path):
    X, y = table(300, 10)
    ten = write_h5(tmp_path / "ten.h5", X, y)
    ok(lepton(3, "train", small_config(tmp_path, ten)))
    model = tmp_path / "run" / "model.h5"
    X12, y12 = table(90, 12, seed=1)
    twelve = write_h5(tmp_path / "twelve.h5", X12, y12)
    needles = [f"'{twelve}:X' has 12 features", f"'{model}' was trained on 10"]
    check_error(lepton(3, "evaluate", "--model", model, "--data", twelve), *needles)
    out = tmp_path / "pred.h5"
    check_error(
        lepton(3, "predict", "--model", model, "--data", twelve, "--out", out), *needles, out=out
    )
    # label 2 for a binary model: evaluating, and training
    three = write_h5(tmp_path / "three.h5", X, np.where(np.arange(300) == 7, 2.0, y))
    label_msg = [f"'{three}:y' holds label 2 outside the classes 0..1"]
    check_error(lepton(3, "evaluate", "--model", model, "--data", three), *label_msg)
    cfg = small_config(tmp_path, three, name="bad")
    check_error(lepton(3, "train", cfg), *label_msg)
    assert not (tmp_path / "bad").exists()
    halves = write_h5(tmp_path / "halves.h5", X, y / 2)
    check_error(lepton(3, "train", small_config(tmp_path, halves, name="bad")), "non-integer")


def test_early_stopping_restores_the_best_epoch(tmp_path):
    # Few noisy rows and a wide MLP with a large step: the validation loss soon rises.
    rng = np.random.default_rng(5)
    X = rng.normal(size=(240, 20))
    y = ((X[:, 0] + rng.normal(scale=1.5, size=240)) > 0).astype(np.float64)
    data = write_h5(tmp_path / "noisy.h5", X, y)
    patience, epochs = 3, 60
    cfg = small_config(
        tmp_path,
        data,
        data={"validation_fraction": 0.3},
        model={"kind": "mlp", "hidden": [64], "activation": "relu"},
        optim={"name": "adam", "lr": 0.02},
        train={"epochs": epochs, "batch_size": 32, "patience": patience, "seed": 1},
        output={"plot": True},
    )
    res = ok(lepton(2, "train", cfg))
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["val"]["log_loss"] for h in history]
    best = int(np.argmin(losses))
    assert len(history) < epochs  # it stopped early ...
    assert len(history) == best + 1 + patience  # ... `patience` epochs after the best one
    assert f"restored the parameters of epoch {best + 1}" in res.stdout
    final = json.loads((run / "results.json").read_text())["metrics"]
    assert final["val"] == history[best]["val"]  # the best epoch's model, bit for bit
    assert final["val"] != history[-1]["val"]  # not the last one's
    assert (run / "history.png").stat().st_size > 1000

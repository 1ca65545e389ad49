"""Foundation under real MPI: partitioned reads, one allreduce, training that agrees across 1-3 ranks."""

import json

import h5py
import numpy as np
import pytest

from tests.conftest import (
    SCRIPTS,
    datagen,
    lepton,
    ok,
    read_params,
    run_mpi,
    write_config,
    write_h5,
)

RANKS = [1, 2, 3]


@pytest.fixture(scope="module")
def logistic_file(tmp_path_factory):
    """1,001 rows: not divisible by 2 or 3, so the partitions are uneven."""
    return datagen(tmp_path_factory.mktemp("data") / "logistic.h5", 1001, 6, seed=3)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize(
    ("sizes", "act", "head"),
    [([6, 1], 0, 1), ([6, 1], 0, 0), ([6, 5, 3, 1], 1, 1), ([6, 4, 3], 0, 2)],
    ids=["logistic", "linear", "mlp-tanh", "softmax-sigmoid"],
)
def test_allreduced_gradient_equals_float64_reference(
    logistic_file, ranks, sizes, act, head, tmp_path
):
    data = logistic_file
    if head == 2:  # three classes for softmax: derive labels from the features, deterministically
        with h5py.File(logistic_file) as fh:
            X = fh["X"][()]
        data = write_h5(tmp_path / "three.h5", X, (X[:, 0] > 0).astype(float) + (X[:, 1] > 0.5))
    res = ok(
        run_mpi(
            ranks,
            [
                str(SCRIPTS / "grad_check.py"),
                str(data),
                json.dumps(sizes),
                str(act),
                str(head),
                "1",
            ],
            timeout=120,
        )
    )
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["ranks"] == ranks and report["count"] == 1001
    assert report["grad_rel"] < 1e-5 and report["loss_rel"] < 1e-5
    if ranks > 1:  # the rows really were partitioned: rank 0 summed only its share
        assert report["driver"] == "mpio" and report["rows_local"] < 1001
    else:
        assert report["rows_local"] == 1001


def test_mpio_driver_is_active_under_make_install(logistic_file):
    res = ok(
        run_mpi(2, [str(SCRIPTS / "grad_check.py"), str(logistic_file), "[6, 1]", "0", "1", "1"])
    )
    assert json.loads(res.stdout.strip().splitlines()[-1])["driver"] == "mpio"
    assert h5py.get_config().mpi


def test_datagen_is_identical_for_any_rank_count(tmp_path):
    files = []
    for n in (1, 3):
        out = tmp_path / f"d{n}.h5"
        ok(
            lepton(
                n,
                "datagen",
                "--task",
                "linear",
                "--rows",
                70_001,
                "--features",
                3,
                "--seed",
                9,
                "--out",
                out,
            )
        )
        files.append(out)
    with h5py.File(files[0]) as a, h5py.File(files[1]) as b:
        assert np.array_equal(a["X"][()], b["X"][()]) and np.array_equal(a["y"][()], b["y"][()])
        assert a["X"].dtype == np.float32 and a["X"].shape == (70_001, 3)


def train_config(tmp_path, data_file, name, **sections):
    base = {
        "data": {"train": str(data_file), "validation_fraction": 0.2, "scale": "zscore"},
        "model": {"kind": "logistic"},
        "optim": {"name": "adam", "lr": 0.05},
        "train": {"epochs": 3, "batch_size": 64, "seed": 11},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    return write_config(tmp_path / f"{name}.toml", base)


@pytest.mark.parametrize(
    "variant",
    [
        {"optim": {"name": "adam", "lr": 0.05}, "train": {"batch_size": 64}},
        {"optim": {"name": "momentum", "lr": 0.1}, "train": {"batch_size": 0, "epochs": 5}},
        {"optim": {"name": "lbfgs", "lr": 1.0}, "train": {"batch_size": 0, "epochs": 20}},
        {
            "model": {"kind": "mlp", "hidden": [5, 3], "activation": "tanh"},
            "optim": {"name": "sgd", "lr": 0.2},
            "train": {"batch_size": 50},
        },
        {  # a hidden layer of 64: BLAS GEMMs over row blocks
            "model": {"kind": "mlp", "hidden": [64, 8], "activation": "relu"},
            "optim": {"name": "sgd", "lr": 0.1},
            "train": {"batch_size": 50},
        },
    ],
    ids=["adam-minibatch", "momentum-fullbatch", "lbfgs", "mlp-sgd", "mlp-gemm"],
)
def test_training_gives_the_same_parameters_for_1_2_3_ranks(logistic_file, tmp_path, variant):
    params, results = {}, {}
    for n in RANKS:
        cfg = train_config(tmp_path, logistic_file, f"run{n}", **variant)
        ok(lepton(n, "train", cfg, timeout=240))
        params[n] = read_params(tmp_path / f"run{n}" / "model.h5")
        results[n] = json.loads((tmp_path / f"run{n}" / "results.json").read_text())
    # Each run trained on the ranks it was started with, on the same rows and steps; were mpiexec
    # to start n separate 1-rank jobs instead, this would compare a 1-rank run with itself.
    assert {n: r["ranks"] for n, r in results.items()} == {n: n for n in RANKS}
    assert len({(r["steps"], r["rows"]["train"], r["rows"]["val"]) for r in results.values()}) == 1
    scale = np.max(np.abs(params[1]))
    for n in (2, 3):
        assert np.max(np.abs(params[n] - params[1])) / scale < 1e-5, (n, params[n], params[1])


def test_run_directory_contents(logistic_file, tmp_path):
    cfg = train_config(tmp_path, logistic_file, "run", output={"plot": True})
    res = ok(lepton(2, "train", cfg))
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["ranks"] == 2
    assert results["config"]["optim"]["lr"] == 0.05
    assert set(results["timing"]) >= {"io_s", "compute_s", "comm_s", "total_s"}
    assert results["throughput"]["rows_per_s"] > 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert (run / "model.h5").is_file() and (run / "history.png").stat().st_size > 1000
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert "rows/s" in res.stdout and "io" in res.stdout and "comm" in res.stdout
    assert res.stdout.count("epoch   1/3") == 1  # only rank 0 prints


def test_logistic_regression_reaches_scikit_learn_optimum(tmp_path):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3001, 5))
    w = np.array([1.5, -2.0, 0.5, 0.0, 1.0])
    y = (rng.random(3001) < 1 / (1 + np.exp(-(X @ w + 0.3)))).astype(float)
    data = write_h5(tmp_path / "lr.h5", X, y)
    l2 = 1e-3
    # scikit-learn minimises 0.5|w|^2 + C sum(loss); ours mean(loss) + l2/2 |w|^2: C = 1/(l2 n)
    sk = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(X, y)
    for n in (1, 3):
        cfg = train_config(
            tmp_path,
            data,
            f"lr{n}",
            data={"validation_fraction": 0.0, "scale": "none"},
            model={"l2": l2},
            optim={"name": "lbfgs", "lr": 1.0},
            train={"batch_size": 0, "epochs": 100},
        )
        ok(lepton(n, "train", cfg))
        params = read_params(tmp_path / f"lr{n}" / "model.h5")
        ours = np.concatenate([sk.coef_[0], sk.intercept_])
        assert np.max(np.abs(params - ours)) < 1e-4, (params, ours)


def test_linear_regression_recovers_true_coefficients(tmp_path):
    data = tmp_path / "lin.h5"
    ok(
        lepton(
            2,
            "datagen",
            "--task",
            "linear",
            "--rows",
            20_000,
            "--features",
            4,
            "--seed",
            5,
            "--noise",
            "0.1",
            "--out",
            data,
        )
    )
    with h5py.File(data) as fh:
        w, b = fh.attrs["true_coef"][:, 0], fh.attrs["true_intercept"][0]
    cfg = train_config(
        tmp_path,
        data,
        "lin",
        data={"validation_fraction": 0.0, "scale": "none"},
        model={"kind": "linear"},
        optim={"name": "lbfgs", "lr": 1.0},
        train={"batch_size": 0, "epochs": 50},
    )
    ok(lepton(3, "train", cfg))
    params = read_params(tmp_path / "lin" / "model.h5")
    # standard error of OLS coefficients ~ noise / sqrt(n) = 7e-4: allow 5 sigma
    assert np.max(np.abs(params - np.append(w, b))) < 5 * 0.1 / np.sqrt(20_000)

"""The communication layer under real ``mpiexec``: Horovod against MPI, update strategies against
sync, compression with error feedback, reproducible mode bit for bit across 1, 2 and 3 ranks."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests.conftest import lepton, mpi_env, ok, read_params, write_config, write_h5
from tests.resume_checks import check_resumed, newest_valid

HOROVOD = importlib.util.find_spec("horovod") is not None  # found without importing it


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    """The demo problem, smaller: synthetic logistic data from ``lepton datagen``."""
    path = tmp_path_factory.mktemp("demo") / "demo.h5"
    args = ["--task", "logistic", "--rows", 8000, "--features", 32, "--seed", 7, "--out", path]
    ok(lepton(2, "datagen", *args))
    return path


@pytest.fixture(scope="module")
def cancer_file(tmp_path_factory):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    return write_h5(tmp_path_factory.mktemp("cancer") / "cancer.h5", X, y.astype(np.float64))


@pytest.fixture(scope="module")
def uneven_file(tmp_path_factory):
    """5,001 rows: 64 global blocks of 79 rows, the last of 24; 64 blocks split 22/21/21."""
    path = tmp_path_factory.mktemp("uneven") / "uneven.h5"
    args = ["--task", "logistic", "--rows", 5001, "--features", 6, "--seed", 4, "--out", path]
    ok(lepton(1, "datagen", *args))
    return path


def train(tmp_path, ranks, data, name, sections, *overrides, timeout=240, env=None):
    """Run one training job; returns (final parameters, results.json)."""
    base = {
        "data": {"train": str(data), "validation_fraction": 0.2, "scale": "zscore"},
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    cfg = write_config(tmp_path / f"{name}.toml", base)
    ok(lepton(ranks, "train", cfg, *overrides, timeout=timeout, env=env))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return read_params(tmp_path / name / "model.h5"), results


def final_loss(results) -> float:
    return results["metrics"]["train"]["log_loss"]


# ---- Horovod and MPI give the same parameters ------------------------------------------------
MLP_ADAM = {
    "model": {"kind": "mlp", "hidden": [16, 8], "activation": "tanh"},
    "optim": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 3, "batch_size": 500, "seed": 5},
}


@pytest.mark.parametrize(
    ("ranks", "strategy"),
    [(2, "sync"), (3, "sync"), (2, "overlap"), (2, "local_sgd")],
)
def test_horovod_and_mpi_backends_give_the_same_parameters(demo_file, tmp_path, ranks, strategy):
    if not HOROVOD:
        if os.environ.get("CI"):
            pytest.fail("horovod is not installed but CI is set: `make install-horovod` failed?")
        pytest.skip("horovod is not installed (make install-horovod); CI makes this a failure")
    params = {}
    for backend in ("mpi", "horovod"):
        comm = {"comm": {"backend": backend, "strategy": strategy, "local_steps": 4}}
        params[backend], res = train(tmp_path, ranks, demo_file, backend, {**MLP_ADAM, **comm})
        assert res["ranks"] == ranks and res["config"]["comm"]["backend"] == backend
    scale = np.max(np.abs(params["mpi"]))
    assert np.max(np.abs(params["horovod"] - params["mpi"])) / scale < 1e-6


# ---- local SGD and overlap reach the loss of sync --------------------------------------------
PROBLEMS = {
    "demo-logistic-adam": (
        "demo_file",
        {
            "model": {"kind": "logistic", "init": "zeros"},
            "optim": {"name": "adam", "lr": 0.02},
            "train": {"epochs": 20, "batch_size": 512},
        },
    ),
    "demo-mlp-momentum": (
        "demo_file",
        {
            "model": {"kind": "mlp", "hidden": [32, 16], "activation": "relu", "init": "he"},
            "optim": {"name": "momentum", "lr": 0.05},
            "train": {"epochs": 10, "batch_size": 256},
        },
    ),
    "cancer-logistic-adam": (
        "cancer_file",
        {
            "model": {"kind": "logistic", "init": "zeros", "l2": 0.01},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 100, "batch_size": 128},
        },
    ),
    "cancer-mlp-momentum": (
        "cancer_file",
        {
            "model": {"kind": "mlp", "hidden": [16], "l2": 0.01},
            "optim": {"name": "momentum", "lr": 0.005},
            "train": {"epochs": 60, "batch_size": 128},
        },
    ),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_local_sgd_and_overlap_reach_the_sync_loss(problem, tmp_path, request):
    """The same budget of epochs on 3 ranks, trained until the loss has levelled off: the final
    training loss of each strategy within 1 % of sync's."""
    fixture, sections = PROBLEMS[problem]
    data = request.getfixturevalue(fixture)
    loss = {}
    for strategy in ("sync", "local_sgd", "overlap"):
        body = {**sections, "comm": {"strategy": strategy, "local_steps": 8}}
        _, res = train(tmp_path, 3, data, strategy, body)
        loss[strategy] = final_loss(res)
    for strategy in ("local_sgd", "overlap"):
        assert abs(loss[strategy] - loss["sync"]) / loss["sync"] < 0.01, loss


def test_local_sgd_with_one_local_step_is_sync(cancer_file, tmp_path):
    """With K = 1 and a linear optimiser (momentum), averaging parameters and momentum is
    averaging gradients: the two strategies must agree to rounding."""
    body = {
        "model": {"kind": "mlp", "hidden": [8]},
        "optim": {"name": "momentum", "lr": 0.02},
        "train": {"epochs": 4, "batch_size": 64},
    }
    sync, _ = train(tmp_path, 3, cancer_file, "sync", body)
    k1, _ = train(
        tmp_path, 3, cancer_file, "k1", body, "comm.strategy=local_sgd", "comm.local_steps=1"
    )
    k8, _ = train(
        tmp_path, 3, cancer_file, "k8", body, "comm.strategy=local_sgd", "comm.local_steps=8"
    )
    scale = np.max(np.abs(sync))
    assert np.max(np.abs(k1 - sync)) / scale < 1e-12
    assert np.max(np.abs(k8 - sync)) / scale > 1e-6  # the control: K = 8 is another method


# ---- compression with error feedback -----------------------------------------------------------
@pytest.mark.parametrize(
    ("compression", "strategy"), [("fp16", "sync"), ("bf16", "sync"), ("fp16", "overlap")]
)
def test_compressed_training_reaches_the_uncompressed_loss(
    demo_file, tmp_path, compression, strategy
):
    body = {**PROBLEMS["demo-mlp-momentum"][1], "comm": {"strategy": strategy}}
    _, plain = train(tmp_path, 3, demo_file, "plain", body)
    _, packed = train(tmp_path, 3, demo_file, "packed", body, f"comm.compression={compression}")
    assert abs(final_loss(packed) - final_loss(plain)) / final_loss(plain) < 0.01


# ---- reproducible mode ----------------------------------------------------------------------------
REPRODUCIBLE = {
    "mlp-minibatch-adam": {
        "model": {"kind": "mlp", "hidden": [8, 4], "activation": "tanh"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 256},
    },
    "wide-mlp-float32-products": {  # the GEMM path, float32 products: bitwise as well
        "model": {"kind": "mlp", "hidden": [64], "activation": "relu"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 256, "products": "float32"},
    },
    "logistic-fullbatch-momentum": {
        "model": {"kind": "logistic"},
        "optim": {"name": "momentum", "lr": 0.5},
        "train": {"epochs": 15, "batch_size": 0},
    },
    "logistic-lbfgs": {
        "model": {"kind": "logistic"},
        "optim": {"name": "lbfgs", "lr": 1.0},
        "train": {"epochs": 10, "batch_size": 0},
    },
}


@pytest.mark.parametrize("variant", list(REPRODUCIBLE))
def test_reproducible_mode_is_bitwise_equal_for_1_2_3_ranks(uneven_file, tmp_path, variant):
    body = {**REPRODUCIBLE[variant], "comm": {"reproducible": True}}
    params = {n: train(tmp_path, n, uneven_file, f"r{n}", body)[0] for n in (1, 2, 3)}
    assert params[1].tobytes() == params[2].tobytes() == params[3].tobytes()


@pytest.mark.parametrize("optim", ["lbfgs", "momentum"])
def test_float32_products_of_wide_rows_are_bitwise_equal_for_1_2_3_ranks(tmp_path, optim):
    """A logistic model on 48 float32 features with train.products = "float32" (the
    float32-product kernel) in reproducible mode: the same bits at 1, 2 and 3 ranks, within
    1e-5 of the float64 products' run and not equal to it (the other kernel did run)."""
    path = tmp_path / "wide.h5"
    args = ["--task", "logistic", "--rows", 3001, "--features", 48, "--seed", 6, "--out", path]
    ok(lepton(1, "datagen", *args))
    lr = 1.0 if optim == "lbfgs" else 0.5
    body = {
        "model": {"kind": "logistic"},
        "optim": {"name": optim, "lr": lr},
        "train": {"epochs": 6, "batch_size": 0, "products": "float32"},
        "comm": {"reproducible": True},
    }
    params = {n: train(tmp_path, n, path, f"{optim}{n}", body)[0] for n in (1, 2, 3)}
    assert params[1].tobytes() == params[2].tobytes() == params[3].tobytes()
    body["train"] = {**body["train"], "products": "float64"}
    f64, _ = train(tmp_path, 2, path, f"{optim}64", body)
    assert f64.tobytes() != params[1].tobytes()
    assert np.max(np.abs(f64 - params[1])) / np.max(np.abs(f64)) < 1e-5


def test_default_mode_is_not_bitwise_rank_invariant(uneven_file, tmp_path):
    """The control for the test above: without the mode, sums in rank order differ in the last
    bits (so the bitwise test is not passing by accident)."""
    body = REPRODUCIBLE["mlp-minibatch-adam"]
    params = {n: train(tmp_path, n, uneven_file, f"d{n}", body)[0] for n in (1, 3)}
    assert params[1].tobytes() != params[3].tobytes()
    assert np.max(np.abs(params[1] - params[3])) / np.max(np.abs(params[1])) < 1e-6


def test_reproducible_mode_with_large_blocks(tmp_path):
    """70,001 rows: 1,024-row blocks (69 of them, the last of 369 rows) split 35/34 and 23/23/23."""
    path = tmp_path / "big.h5"
    args = ["--task", "logistic", "--rows", 70001, "--features", 4, "--seed", 9, "--out", path]
    ok(lepton(2, "datagen", *args))
    body = {**REPRODUCIBLE["logistic-fullbatch-momentum"], "comm": {"reproducible": True}}
    body["train"] = {"epochs": 4, "batch_size": 0}
    params = {n: train(tmp_path, n, path, f"b{n}", body)[0] for n in (1, 2, 3)}
    assert params[1].tobytes() == params[2].tobytes() == params[3].tobytes()


# ---- strategies keep checkpoints exact --------------------------------------------------------------
@pytest.mark.parametrize(
    "comm",
    [{"strategy": "local_sgd", "local_steps": 3}, {"strategy": "overlap"}, {"compression": "fp16"}],
    ids=["local_sgd", "overlap", "fp16"],
)
def test_resume_after_a_crash_is_exact(uneven_file, tmp_path, comm):
    body = {
        **REPRODUCIBLE["mlp-minibatch-adam"],
        "comm": comm,
        "checkpoint": {"every_steps": 7},
    }
    reference, _ = train(tmp_path, 3, uneven_file, "ref", body)
    run = tmp_path / "crash"
    cfg = write_config(
        tmp_path / "crash.toml",
        {
            "data": {"train": str(uneven_file), "validation_fraction": 0.2, "scale": "zscore"},
            **body,
            "output": {"dir": str(run), "plot": False},
        },
    )
    crashed = lepton(3, "train", cfg, env=mpi_env(LEPTON_FAULT="raise=1@40"), timeout=120)
    assert crashed.returncode != 0
    path, state = newest_valid(run / "checkpoints")
    res = ok(lepton(3, "train", cfg, "--resume", "auto", timeout=240))
    check_resumed(res.stdout, run, path, state)  # continued from it, not restarted from step 0
    assert read_params(run / "model.h5").tobytes() == reference.tobytes()


@pytest.mark.parametrize("reproducible", [True, False], ids=["reproducible", "default"])
def test_a_run_crashed_on_3_ranks_continues_on_2(uneven_file, tmp_path, reproducible):
    """Continuing on fewer ranks (a node lost): reproducible mode ends with the very bits of the
    uninterrupted 3-rank run; the default mode agrees with it to rounding."""
    body = {
        **REPRODUCIBLE["mlp-minibatch-adam"],
        "comm": {"reproducible": reproducible},
        "checkpoint": {"every_steps": 7},
    }
    reference, _ = train(tmp_path, 3, uneven_file, "ref", body)
    run = tmp_path / "lost"
    cfg = write_config(
        tmp_path / "lost.toml",
        {
            "data": {"train": str(uneven_file), "validation_fraction": 0.2, "scale": "zscore"},
            **body,
            "output": {"dir": str(run), "plot": False},
        },
    )
    crashed = lepton(3, "train", cfg, env=mpi_env(LEPTON_FAULT="raise=2@40"), timeout=120)
    assert crashed.returncode != 0
    path, state = newest_valid(run / "checkpoints")
    res = ok(lepton(2, "train", cfg, "--resume", "auto", timeout=240))
    check_resumed(res.stdout, run, path, state)
    assert json.loads((run / "results.json").read_text())["ranks"] == 2
    params = read_params(run / "model.h5")
    if reproducible:
        assert params.tobytes() == reference.tobytes()
    else:
        assert np.max(np.abs(params - reference)) / np.max(np.abs(reference)) < 1e-9


def test_meaningless_combination_is_one_clear_error(uneven_file, tmp_path):
    cfg = write_config(
        tmp_path / "bad.toml",
        {
            "data": {"train": str(uneven_file)},
            "comm": {"reproducible": True, "strategy": "overlap"},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    res = lepton(2, "train", cfg, timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("comm.reproducible") == 1 and "sync" in res.stderr
    assert not (tmp_path / "run").exists()


def test_strategies_on_the_demo_job_itself(tmp_path):
    """`make run`'s own config (MLP [32, 16], Adam, batch 1024, 8 epochs, 2 ranks): local_sgd and
    overlap end within 1 % of sync's final training loss."""
    from tests.conftest import ROOT

    train, test = tmp_path / "train.h5", tmp_path / "test.h5"
    common = ["--task", "logistic", "--features", 32, "--seed", 7]
    ok(lepton(2, "datagen", *common, "--rows", 200_000, "--out", train))
    ok(lepton(2, "datagen", *common, "--rows", 50_000, "--start-row", 200_000, "--out", test))
    loss = {}
    for strategy in ("sync", "local_sgd", "overlap"):
        run = tmp_path / strategy
        ok(
            lepton(
                2,
                "train",
                ROOT / "jobs" / "configs" / "demo.toml",
                f"data.train={train}",
                f"data.test={test}",
                f"comm.strategy={strategy}",
                f"output.dir={run}",
                "output.plot=false",
                timeout=300,
            )
        )
        loss[strategy] = json.loads((run / "results.json").read_text())["metrics"]["train"][
            "log_loss"
        ]
    for strategy in ("local_sgd", "overlap"):
        assert abs(loss[strategy] / loss["sync"] - 1) < 0.01, loss

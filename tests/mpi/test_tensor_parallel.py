"""Tensor parallelism (``model.parallel = "tensor"``) under real ``mpiexec``: grids 1x2, 2x2 and
4x1 (data x tensor) give the parameters of plain data parallelism on the same data (1e-10
relative), a checkpoint written on 2x2 resumes on 4x1 and on one rank, the saved model predicts
as the data-parallel one, and the unsupported combinations are one-line errors."""

import json
import os
import signal

import h5py
import numpy as np
import pytest

from tests.conftest import (
    finish,
    lepton,
    mpi_env,
    ok,
    rank_pids,
    read_params,
    small_mlp_config,
    start_mpi,
    wait_for_checkpoint,
    write_config,
    write_h5,
)
from tests.resume_checks import check_resumed, newest_valid

RTOL = 1e-10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small binary problem and a small three-class one (``lepton datagen``)."""
    base = tmp_path_factory.mktemp("tp")
    out = {}
    for name, task, extra in (("binary", "logistic", []), ("blobs", "blobs", ["--classes", 3])):
        path = base / f"{name}.h5"
        args = ["--task", task, "--rows", 600, "--features", 6, "--seed", 3, *extra]
        ok(lepton(1, "datagen", *args, "--out", path, timeout=120))
        out[name] = path
    return out


BINARY_ADAM = {
    "model": {"kind": "mlp", "hidden": [8, 6, 4], "activation": "tanh"},  # odd: head replicated
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 3, "batch_size": 64, "seed": 5, "patience": 2},  # best params kept
}
OTHERS = {
    "momentum-relu-l2": (
        "binary",
        {
            "model": {"kind": "mlp", "hidden": [8, 4], "activation": "relu", "l2": 0.01},
            "optim": {"name": "momentum", "lr": 0.05},
            "train": {"epochs": 2, "batch_size": 100, "seed": 2},
        },
    ),
    "sgd-sigmoid-softmax": (
        "blobs",
        {
            "model": {"kind": "mlp", "hidden": [6, 5, 4, 3], "activation": "sigmoid"},
            "optim": {"name": "sgd", "lr": 0.2},
            "train": {"epochs": 2, "batch_size": 0, "seed": 4},
        },
    ),
}


def config(tmp_path, data, name, sections, tensor_ranks=None):
    base = {
        "data": {
            "train": str(data),
            "test": str(data),
            "validation_fraction": 0.2,
            "scale": "zscore",
        },
        "output": {"dir": str(tmp_path / name), "plot": False},
    }
    for key, body in sections.items():
        base.setdefault(key, {}).update(body)
    if tensor_ranks is not None:
        base["model"] = {**base["model"], "parallel": "tensor"}
        base["comm"] = {**base.get("comm", {}), "tensor_ranks": tensor_ranks}
    return write_config(tmp_path / f"{name}.toml", base)


def train(tmp_path, ranks, data, name, sections, tensor_ranks=None, *extra):
    cfg = config(tmp_path, data, name, sections, tensor_ranks)
    ok(lepton(ranks, "train", cfg, *extra, timeout=180))
    return read_params(tmp_path / name / "model.h5")


def close(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def data_parallel(files, tmp_path_factory):
    """The data-parallel reference run (2 ranks) of BINARY_ADAM."""
    tmp = tmp_path_factory.mktemp("dp")
    return tmp, train(tmp, 2, files["binary"], "dp", BINARY_ADAM)


@pytest.mark.parametrize(("ranks", "k"), [(2, 2), (4, 2), (4, 1)])
def test_grids_give_the_data_parallel_parameters(files, data_parallel, tmp_path, ranks, k):
    got = train(tmp_path, ranks, files["binary"], f"tp{ranks}x{k}", BINARY_ADAM, k)
    assert close(got, data_parallel[1]) < RTOL
    dp_dir = data_parallel[0] / "dp"
    for name in ("dp", f"tp{ranks}x{k}"):
        results = json.loads(
            ((dp_dir if name == "dp" else tmp_path / name) / "results.json").read_text()
        )
        if name == "dp":
            want = results["metrics"]
        else:  # metrics from the slices, summed over the data groups: every row counted once
            for split in ("train", "val", "test"):
                got_m, want_m = results["metrics"][split], want[split]
                assert got_m["rows"] == want_m["rows"]
                assert got_m["confusion"] == want_m["confusion"]
                assert got_m["log_loss"] == pytest.approx(want_m["log_loss"], rel=1e-9)
    with h5py.File(tmp_path / f"tp{ranks}x{k}" / "model.h5") as fh:
        meta = fh.attrs["meta"]
    assert '"parallel": "tensor"' in meta and f'"tensor_ranks": {k}' in meta


@pytest.mark.parametrize("case", sorted(OTHERS))
def test_other_optimizers_and_heads(files, tmp_path, case):
    data, sections = OTHERS[case]
    want = train(tmp_path, 2, files[data], "dp", sections)
    got = train(tmp_path, 2, files[data], "tp", sections, 2)
    assert close(got, want) < RTOL


def test_checkpoint_resumes_on_other_grids(files, tmp_path):
    """2x2 for two epochs, then two more on 4x1 and on one rank: both equal four data-parallel
    epochs; the checkpoint holds the data-parallel layout (full parameters, full Adam state);
    a data-parallel checkpoint resumes on 2x2."""
    data = files["binary"]
    longer = {**BINARY_ADAM, "train": {**BINARY_ADAM["train"], "epochs": 4}}
    want = train(tmp_path, 2, data, "dp4", longer)
    train(tmp_path, 2, data, "dp2", BINARY_ADAM, None, "train.epochs=2")
    train(tmp_path, 4, data, "first", BINARY_ADAM, 2, "train.epochs=2")
    ckpts = sorted((tmp_path / "first" / "checkpoints").glob("ckpt-*.h5"))
    ref = sorted((tmp_path / "dp2" / "checkpoints").glob("ckpt-*.h5"))
    with h5py.File(ckpts[-1]) as a, h5py.File(ref[-1]) as b:
        names = []
        a.visit(names.append)
        want_names = []
        b.visit(want_names.append)
        assert names == want_names
        for name in names:
            if isinstance(a[name], h5py.Dataset) and a[name].dtype.kind == "f":
                assert a[name].shape == b[name].shape, name
                if a[name].size:
                    assert close(a[name][()], b[name][()]) < RTOL, name
    first, first_state = newest_valid(tmp_path / "first" / "checkpoints")
    dp2, dp2_state = newest_valid(tmp_path / "dp2" / "checkpoints")
    assert (first, dp2) == (ckpts[-1], ref[-1]) and first_state.epoch == dp2_state.epoch == 2
    runs = [(4, 1, "on4x1", first, first_state), (1, None, "on1", first, first_state)]
    # and the other way: a data-parallel checkpoint continues on a 2x2 grid
    runs.append((4, 2, "dp_on2x2", dp2, dp2_state))
    for ranks, k, name, path, state in runs:
        cfg = config(tmp_path, data, name, longer, k)
        res = ok(lepton(ranks, "train", cfg, "--resume", path, timeout=180))
        check_resumed(res.stdout, tmp_path / name, path, state)  # not a fresh 4-epoch run
        assert close(read_params(tmp_path / name / "model.h5"), want) < RTOL


def test_predict_equals_data_parallel(files, data_parallel, tmp_path):
    dp_dir, _ = data_parallel
    train(tmp_path, 2, files["binary"], "tp", BINARY_ADAM, 2)
    outs = {}
    for name, model in (("dp", dp_dir / "dp" / "model.h5"), ("tp", tmp_path / "tp" / "model.h5")):
        out = tmp_path / f"pred-{name}.h5"
        ok(lepton(2, "predict", "--model", model, "--data", files["binary"], "--out", out))
        with h5py.File(out) as fh:
            outs[name] = fh["probabilities"][()], fh["labels"][()]
    assert close(outs["tp"][0], outs["dp"][0]) < 1e-9
    assert (outs["tp"][1] == outs["dp"][1]).all()


REFUSED = [
    (4, {}, "does not divide the rank count 2"),  # 2 ranks
    (3, {}, "does not divide model.hidden[0] = 8"),
    (2, {"model": {"kind": "logistic", "hidden": []}}, "not a 'logistic' model"),
    (2, {"optim": {"name": "lbfgs"}}, "lbfgs is not supported"),
    (2, {"comm": {"strategy": "overlap"}}, 'only "sync"'),
    (2, {"comm": {"reproducible": True}}, "comm.reproducible"),
    (2, {"data": {"stream": True}}, "data.stream"),
]


@pytest.mark.parametrize(("k", "sections", "needle"), REFUSED)
def test_refusals_are_one_line(files, tmp_path, k, sections, needle):
    merged = {key: {**BINARY_ADAM.get(key, {}), **body} for key, body in sections.items()}
    cfg = config(tmp_path, files["binary"], "bad", {**BINARY_ADAM, **merged}, k)
    res = lepton(2, "train", cfg, timeout=120)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.stderr.count("lepton: error") == 1, res.stderr
    assert needle in res.stderr, res.stderr
    assert not (tmp_path / "bad").exists()  # nothing written


def test_tensor_ranks_without_tensor_parallelism(files, tmp_path):
    cfg = config(tmp_path, files["binary"], "bad", BINARY_ADAM)
    res = lepton(2, "train", cfg, "comm.tensor_ranks=2", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("lepton: error") == 1
    assert 'needs model.parallel = "tensor"' in res.stderr


@pytest.fixture(scope="module")
def longer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sig") / "train.h5"
    args = ["--task", "logistic", "--rows", 4001, "--features", 6, "--seed", 2]
    ok(lepton(1, "datagen", *args, "--out", path, timeout=120))
    return path


def test_a_signal_to_one_rank_stops_the_whole_grid(longer_file, tmp_path):
    """SIGUSR1 to rank 3 only (tensor index 1 of data group 1): its flag travels through its
    tensor group's forward sum and the data groups' buffer, so all four ranks stop at the same
    step with a checkpoint (exit 75), and --resume auto ends on the uninterrupted run's bits."""
    tensor = {"model": {"parallel": "tensor"}, "comm": {"tensor_ranks": 2}}
    ref_cfg = small_mlp_config(tmp_path, longer_file, "ref", 4, **tensor)
    ok(lepton(4, "train", ref_cfg, timeout=240))
    want = read_params(tmp_path / "ref" / "model.h5")
    cfg = small_mlp_config(tmp_path, longer_file, "sig", 4, **tensor)
    run = tmp_path / "sig"
    env = mpi_env(LEPTON_FAULT="delay=0.01", LEPTON_VERBOSE="1")
    proc = start_mpi(4, ["-m", "lepton_hpc", "train", str(cfg)], env=env)
    wait_for_checkpoint(proc, run)
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1, 2, 3]
    os.kill(pids[3], signal.SIGUSR1)
    res = finish(proc, timeout=60)
    assert res.returncode == 75, res.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped"
    steps = {
        line.rsplit("at step ", 1)[1].split(";")[0]
        for line in res.stderr.splitlines()
        if "stopped by signal at step" in line
    }
    assert steps == {str(status["step"])}
    assert res.stderr.count("stopped by signal") == 4
    ok(lepton(4, "train", cfg, "--resume", "auto", timeout=240))
    assert np.array_equal(read_params(run / "model.h5"), want)


def test_a_data_error_in_one_data_group_fails_every_rank_once(tmp_path):
    """A NaN in the last row: only data group 1 of a 2x2 grid reads it; the error is shared
    with the whole job and printed once."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4))
    X[-1, 2] = np.nan
    data = write_h5(tmp_path / "nan.h5", X, (X[:, 0] > 0).astype(np.float64))
    cfg = config(tmp_path, data, "nan", BINARY_ADAM, 2)
    res = lepton(4, "train", cfg, timeout=120)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("lepton: error") == 1, res.stderr
    assert "NaN" in res.stderr or "nan" in res.stderr.lower(), res.stderr

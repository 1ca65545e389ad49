"""The scripts of ``examples/`` run as a user runs them (alone, or under ``mpiexec``) and do
what they say: a model trained, evaluated and exported; one SPMD model on every rank; a
scikit-learn pipeline and grid search."""

import re
import subprocess

import h5py
import numpy as np
import pytest

from tests.conftest import PYTHON, ROOT, mpi_env, ok, run_mpi

EXAMPLES = ROOT / "examples"


def run_alone(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = mpi_env()
    res = subprocess.run(
        [PYTHON, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_quickstart_trains_evaluates_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import lepton_hpc as lp

    res = run_alone("quickstart.py", str(tmp_path / "qs"), cwd=tmp_path)
    folder = tmp_path / "qs"
    metrics = lp.load_model(folder / "run" / "model.h5").evaluate(folder / "test.h5")
    assert f"test metrics: {metrics}" in res.stdout
    assert metrics["accuracy"] > 0.85  # the synthetic labels are 90 % linearly separable
    with h5py.File(folder / "test.h5", "r") as fh:
        X = fh["X"][()]
    session = ort.InferenceSession(str(folder / "model.onnx"))
    probabilities = session.run(["probabilities"], {"X": X})[0].ravel()
    expected = lp.load_model(folder / "run" / "model.h5").predict_proba(X)[:, 1]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.parametrize("ranks", [1, 3])
def test_sklearn_spmd_gives_one_model_on_every_rank(ranks, tmp_path):
    res = ok(run_mpi(ranks, [str(EXAMPLES / "sklearn_spmd.py")], timeout=300, cwd=tmp_path))
    found = dict(
        re.findall(r"(logistic|mlp): classes \['ham', 'spam'\], test accuracy ([\d.]+)", res.stdout)
    )
    assert set(found) == {"logistic", "mlp"}, res.stdout
    assert float(found["logistic"]) > 0.75 and float(found["mlp"]) > 0.9


def test_sklearn_pipeline_and_grid_search(tmp_path):
    res = run_alone("sklearn_pipeline.py", cwd=tmp_path)
    accuracy = re.search(r"pipeline: 3-fold accuracy ([\d.]+)", res.stdout)
    best = re.search(r"grid search: best \{.*\}, accuracy ([\d.]+)", res.stdout)
    assert accuracy and best, res.stdout
    assert float(accuracy[1]) > 0.85 and float(best[1]) > 0.85
    assert list(tmp_path.iterdir()) == []  # the estimators wrote nothing where they ran

"""netCDF-4 files are HDF5 files: a variable is read by its path (``data.x = "grp/features"``),
contiguous ones directly, chunked and compressed ones through HDF5, and a model trained,
evaluated and used for prediction on 2 ranks is bitwise the one from a plain HDF5 file.

The netCDF file is written by the ``netCDF4`` package in a child process: its wheel carries its
own HDF5 library, which is kept out of the process that loads h5py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import h5py
import numpy as np
import pytest

from lepton_hpc.inspect_cmd import inspect_file
from tests.conftest import PYTHON, lepton, ok, read_params, write_config, write_h5

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("netCDF4") is None, reason="netCDF4 is not installed"
)

WRITE_NC = """
import sys, numpy as np, netCDF4
data = np.load(sys.argv[1])
X, y = data["X"], data["y"]
with netCDF4.Dataset(sys.argv[2], "w", format="NETCDF4") as ds:
    ds.title = "lepton test"
    g = ds.createGroup("grp")
    g.createDimension("row", X.shape[0])
    g.createDimension("feature", X.shape[1])
    g.createDimension("sample", None)  # unlimited: chunked
    v = g.createVariable("features", "f8", ("row", "feature"), contiguous=True, fill_value=-9e9)
    v.units = "1"
    v[:] = X
    g.createVariable("labels", "f8", ("row",), contiguous=True, fill_value=-1.0)[:] = y
    z = g.createVariable(
        "zfeatures", "f8", ("sample", "feature"), zlib=True, complevel=4, shuffle=True,
        chunksizes=(100, X.shape[1]), fill_value=np.nan,
    )
    z[:] = X
    c = g.createVariable("row", "i4", ("row",))  # a coordinate variable (dimension scale)
    c[:] = np.arange(X.shape[0])
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nc")
    rng = np.random.default_rng(7)
    X = rng.normal(size=(600, 5))
    y = (X @ rng.normal(size=5) + 0.3 * rng.normal(size=600) > 0).astype(np.float64)
    np.savez(d / "data.npz", X=X, y=y)
    nc = d / "data.nc"
    subprocess.run(
        [PYTHON, "-c", WRITE_NC, str(d / "data.npz"), str(nc)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    plain = write_h5(d / "plain.h5", X, y)
    return d, nc, plain, X, y


def test_netcdf_variables_as_the_inspector_and_reader_see_them(files):
    _, nc, _, X, _ = files
    report = inspect_file(nc, "grp/features", "grp/labels")
    sets = {d["path"]: d for d in report["datasets"]}
    assert report["format"] == "netCDF-4" and "netcdf=" in report["netcdf"]
    assert sets["/grp/features"]["load"] == "direct" and sets["/grp/labels"]["load"] == "direct"
    assert sets["/grp/zfeatures"]["load"] == "compressed"
    assert [f["name"] for f in sets["/grp/zfeatures"]["filters"]] == ["shuffle", "gzip"]
    assert sets["/grp/row"]["dimension_scale"] and "/grp/feature" in report["netcdf_dimensions"]
    assert report["defaults"]["ok"] and report["defaults"]["rows"] == 600
    with h5py.File(nc) as fh:  # the bytes are the array's (the fill value never shows)
        assert fh["grp/zfeatures"][()].tobytes() == X.tobytes()


def train(tmp_path, data, name, x="X", y="y"):
    cfg = write_config(
        tmp_path / f"{name}.toml",
        {
            "data": {"train": str(data), "x": x, "y": y, "scale": "zscore"},
            "model": {"kind": "mlp", "hidden": [6], "activation": "tanh"},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 3, "batch_size": 50, "seed": 1},
            "output": {"dir": str(tmp_path / name), "plot": False},
        },
    )
    ok(lepton(2, "train", cfg))
    return tmp_path / name / "model.h5"


def predictions(path):
    with h5py.File(path) as fh:
        return {k: fh[k][()] for k in fh}


def test_netcdf_trains_evaluates_and_predicts_bitwise_as_hdf5(files, tmp_path):
    _, nc, plain, _, _ = files
    want_model = train(tmp_path, plain, "plain")
    want = json.loads((tmp_path / "plain" / "results.json").read_text())["metrics"]
    ok(lepton(2, "predict", "--model", want_model, "--data", plain, "--out", tmp_path / "p.h5"))
    p = predictions(tmp_path / "p.h5")
    assert sorted(p) == ["labels", "probabilities"]
    # contiguous variables: read directly
    got_model = train(tmp_path, nc, "nc", x="grp/features", y="grp/labels")
    assert read_params(got_model).tobytes() == read_params(want_model).tobytes()
    assert json.loads((tmp_path / "nc" / "results.json").read_text())["metrics"] == want
    # a chunked, compressed variable: read through HDF5
    args = ["--model", got_model, "--data", nc, "--x", "grp/zfeatures", "--out", tmp_path / "q.h5"]
    ok(lepton(2, "predict", *args))
    q = predictions(tmp_path / "q.h5")
    assert sorted(q) == sorted(p) and all(p[k].tobytes() == q[k].tobytes() for k in p)
    args = ["--model", got_model, "--data", nc, "--x", "grp/zfeatures", "--y", "grp/labels"]
    res = ok(lepton(2, "evaluate", *args))
    assert f"accuracy   {want['train']['accuracy']:.6f}" in res.stdout, res.stdout

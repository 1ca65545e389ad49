"""``lepton inspect``: every layout, filter and link of a file listed with the load class the
reader itself would use (they must agree data set by data set), the default x/y check, the table
and JSON outputs, and one error line (exit 2) for missing, damaged and non-HDF5 files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lepton_hpc.comm import SerialComm
from lepton_hpc.data.reader import inspect as reader_inspect
from lepton_hpc.data.reader import read_block
from lepton_hpc.errors import DataError
from lepton_hpc.inspect_cmd import inspect_file
from lepton_hpc.log import Log
from tests.conftest import ROOT

N = 64


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A file holding one data set of each layout the reader meets, and links."""
    d = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(0)
    with h5py.File(d / "other.h5", "w") as fh:
        fh["X"] = rng.normal(size=(N, 3))
    (d / "raw.bin").write_bytes(rng.normal(size=(N, 2)).tobytes())
    with h5py.File(d / "zoo.h5", "w") as fh:
        fh["X"] = rng.normal(size=(N, 3)).astype(np.float32)
        fh["y"] = rng.normal(size=N)
        g = fh.create_group("g/h")
        g.create_dataset("chunked", data=rng.normal(size=(N, 3)), chunks=(16, 3))
        g.create_dataset(
            "gzip",
            data=rng.normal(size=(N, 3)),
            chunks=(16, 3),
            compression="gzip",
            compression_opts=6,
            shuffle=True,
        )
        g.create_dataset("lzf", data=rng.normal(size=(N, 3)), chunks=(N, 3), compression="lzf")
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((8, 2))
        h5py.h5d.create(fh.id, b"compact", h5py.h5t.IEEE_F64LE, space, dcpl=dcpl)
        raw = str(d / "raw.bin")  # HDF5 opens a relative name from the current directory
        fh.create_dataset("external", (N, 2), dtype="<f8", external=[(raw, 0, N * 16)])
        layout = h5py.VirtualLayout(shape=(N, 3), dtype="<f8")
        layout[:] = h5py.VirtualSource("other.h5", "X", shape=(N, 3))
        fh.create_virtual_dataset("virtual", layout)
        fh["ints"] = np.arange(N, dtype=np.int32)
        fh["big"] = rng.normal(size=(N, 2)).astype(">f8")
        fh["cube"] = np.zeros((N, 2, 2))
        fh["names"] = np.array([b"a", b"b"])
        fh["elink"] = h5py.ExternalLink("other.h5", "/X")
        fh["dangling"] = h5py.ExternalLink("missing.h5", "/X")
        fh["alias"] = h5py.SoftLink("/X")
        fh["g/again"] = fh["X"]  # a second hard link: listed once
    return d / "zoo.h5"


EXPECT = {  # path: (layout, load)
    "/X": ("contiguous", "direct"),
    "/y": ("contiguous", "direct"),
    "/g/h/chunked": ("chunked", "chunked"),
    "/g/h/gzip": ("chunked", "compressed"),
    "/g/h/lzf": ("chunked", "compressed"),
    "/compact": ("compact", "through HDF5"),
    "/external": ("external", "through HDF5"),
    "/virtual": ("virtual", "through HDF5"),
    "/ints": ("contiguous", "through HDF5"),
    "/big": ("contiguous", "through HDF5"),
    "/cube": ("contiguous", "direct"),
    "/elink": ("contiguous", "through HDF5"),
}


def test_layouts_filters_and_load_classes(zoo):
    report = inspect_file(zoo, "X", "y")
    sets = {d["path"]: d for d in report["datasets"]}
    assert {p: (d["layout"], d["load"]) for p, d in sets.items()} == EXPECT
    assert report["format"] == "HDF5" and report["not_numeric"] == ["/names (|S1)"]
    assert sets["/X"]["rows"] == N and sets["/X"]["features"] == 3
    assert sets["/X"]["dtype"] == "float32" and sets["/ints"]["features"] == 1
    assert sets["/big"]["dtype"] == "float64 big-endian" and "big-endian" in sets["/big"]["why"]
    assert sets["/ints"]["why"] == "int32 is read as float32"
    assert sets["/g/h/chunked"]["chunks"] == [16, 3] and sets["/X"]["chunks"] is None
    gz = sets["/g/h/gzip"]["filters"]
    assert [f["name"] for f in gz] == ["shuffle", "gzip"] and gz[1]["level"] == 6
    assert [(f["id"], f["name"]) for f in sets["/g/h/lzf"]["filters"]] == [(32000, "lzf")]
    assert sets["/external"]["external_storage"] == [str(zoo.parent / "raw.bin")]
    assert sets["/external"]["notes"] == []
    assert sets["/virtual"]["virtual_sources"] == ["other.h5:X"]
    assert sets["/elink"]["via"] == "external link to other.h5:/X"
    assert any("3-D" in n for n in sets["/cube"]["notes"])
    links = {link["path"]: link for link in report["links"]}
    assert links["/elink"]["ok"] and links["/elink"]["file"] == "other.h5"
    assert not links["/dangling"]["ok"] and links["/alias"]["kind"] == "soft"
    assert "/g/again" not in sets  # the same object as /X


def test_load_class_is_the_readers_verdict(zoo):
    """``direct`` exactly where the reader takes an offset, for every data set (as X and y)."""
    report = inspect_file(zoo, "X", "y")
    for d in report["datasets"]:
        if d["path"] == "/cube":
            continue  # 3-D: the reader refuses it as X
        info = reader_inspect(str(zoo), d["path"], None)
        assert (d["load"] == "direct") == (info.x_offset is not None), d["path"]
    # and the values read through each class are the ones h5py gives
    with h5py.File(zoo) as fh:
        for path in ("/X", "/g/h/gzip", "/virtual", "/external", "/elink"):
            block = read_block(str(zoo), path, None, SerialComm(), Log())
            assert np.array_equal(block.X, fh[path][()]), path


def test_defaults_are_the_readers_check(tmp_path, zoo):
    report = inspect_file(zoo, "X", "y")
    assert report["defaults"] == {
        "x": "X",
        "y": "y",
        "ok": True,
        "rows": N,
        "features": 3,
        "x_direct": True,
        "y_direct": True,
        "x_load": "direct",
        "y_load": "direct",
    }
    chunked = inspect_file(zoo, "/g/h/gzip", "y")["defaults"]
    assert (chunked["x_direct"], chunked["x_load"]) == (False, "compressed")
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as fh:
        fh["X"] = np.zeros((10, 2))
        fh["y"] = np.zeros(9)
    dfl = inspect_file(bad, "X", "y")["defaults"]
    assert not dfl["ok"] and "'y' has shape (9,) but 'X' has 10 rows" in dfl["error"]
    dfl = inspect_file(zoo, "g/h/gzip", "y")["defaults"]
    assert dfl["ok"] and not dfl["x_direct"] and dfl["y_direct"]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    return subprocess.run(
        [sys.executable, "-m", "lepton_hpc", "inspect", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=60,
    )


def test_cli_table_json_and_out(tmp_path, zoo):
    res = cli(zoo)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "/g/h/gzip" in out and "shuffle,gzip(6)" in out and "compressed" in out
    assert "external link /elink -> other.h5:/X" in out and "(dangling" in out
    assert f"lepton train reads x = 'X', y = 'y': {N} rows x 3 features, rows agree" in out
    res = cli(zoo, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["files"][0] == json.loads(
        json.dumps(inspect_file(zoo, "X", "y"))
    )
    target = tmp_path / "report.json"
    assert cli(zoo, "--out", target).returncode == 0
    assert json.loads(target.read_text())["files"][0]["file"] == str(zoo)
    res = cli(zoo, "--out", target)
    assert res.returncode == 2 and "exists; pass --force" in res.stderr
    assert cli(zoo, "--out", target, "--force").returncode == 0
    before = zoo.read_bytes()
    res = cli(zoo, "--out", zoo, "--force")
    assert res.returncode == 2 and "refusing to overwrite an input" in res.stderr
    assert zoo.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporaries


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "does not exist"),
        (b"a,b\n1,2\n", "is not an HDF5 file"),
        (b"CDF\x01\x00\x00\x00\x00", "netCDF-3 (classic) file, not HDF5"),
        (b"PAR1\x00\x00", "a Parquet file, not HDF5: convert it with lepton convert"),
        ("truncated", "is a damaged HDF5 file"),
    ],
)
def test_bad_files_are_one_error_line(tmp_path, zoo, content, needle):
    path = tmp_path / "f.h5"
    if content == "truncated":
        path.write_bytes(zoo.read_bytes()[:3000])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(needle)):
        inspect_file(path, "X", "y")
    res = cli(zoo, path)  # the good file is still reported
    assert res.returncode == 2 and "/g/h/gzip" in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lepton: error:") and needle in lines[0]
    assert "Traceback" not in res.stderr

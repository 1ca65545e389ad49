"""Every way a user can store the same numbers in HDF5 trains on the same bits.

A random layout (type, byte order, 1-D or 2-D features, a target column, chunking, filters,
nested groups, external links) is read by ``read_block`` and must give exactly what the same
values stored plainly give, and exactly the values NumPy converts them to; a failure is always a
``LeptonError`` (one line), never a crash. Real 2-rank training runs on linked and virtual data
sets must equal the run on the plain file bit for bit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data import reader
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log
from tests.conftest import lepton, ok, read_params, write_config
from tests.safety.conftest import assert_unchanged, leftover_temporaries, snapshot

DTYPES = ["f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "bool"]
COMPRESSION = {
    "none": {},
    "gzip": {"compression": "gzip"},
    "shuffle+gzip": {"compression": "gzip", "shuffle": True},
    "lzf": {"compression": "lzf"},
    "shuffle+lzf+fletcher32": {"compression": "lzf", "shuffle": True, "fletcher32": True},
}
try:  # filters from hdf5plugin, when it is installed (zstd: decoded directly with zstandard)
    import hdf5plugin

    COMPRESSION["zstd"] = dict(hdf5plugin.Zstd())
    COMPRESSION["shuffle+lz4"] = {**hdf5plugin.LZ4(), "shuffle": True}
except ImportError:
    pass


def _values(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...], bad: bool):
    """Values of ``dtype`` over its whole range (floats: many magnitudes; ``bad``: one NaN/Inf)."""
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    top = {2: 4, 4: 30, 8: 300}[dtype.itemsize]
    scale = 10.0 ** rng.uniform(-top, top, size=shape)
    out = (rng.normal(size=shape) * scale).astype(dtype)
    out[np.abs(out) > np.finfo(dtype).max] = 0  # scaled past the type's range: inf
    if bad:
        out.flat[rng.integers(out.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return out


@st.composite
def storage(draw, n: int, shape: tuple[int, ...], name: str):
    """How one data set is stored: byte order, chunks, filters, group path, external link."""
    chunked = draw(st.booleans())
    compression = draw(st.sampled_from(list(COMPRESSION))) if chunked else "none"
    chunks = tuple(draw(st.integers(1, s)) for s in shape) if chunked else None
    depth = draw(st.integers(0, 2))
    return {
        "order": draw(st.sampled_from("<>")),
        "chunks": chunks,
        "filters": COMPRESSION[compression],
        "path": "/".join([*["g", "h"][:depth], name]),
        "linked": draw(st.booleans()),
    }


@st.composite
def cases(draw):
    n = draw(st.integers(1, 300))
    d = draw(st.one_of(st.none(), st.integers(1, 7)))  # None: 1-D features
    x_shape = (n,) if d is None else (n, d)
    y_shape = draw(st.sampled_from([(n,), (n, 1)]))
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "x_dtype": np.dtype(draw(st.sampled_from(DTYPES))),
        "y_dtype": np.dtype(draw(st.sampled_from(DTYPES))),
        "x_shape": x_shape,
        "y_shape": y_shape,
        "x": draw(storage(n, x_shape, "X")),
        "y": draw(storage(n, y_shape, "y")),
        "bad": draw(st.integers(0, 9)) == 0,  # one example in ten holds a NaN or Inf
        "direct": draw(st.booleans()),
    }


def _write(fh: h5py.File, other: h5py.File, data: np.ndarray, how: dict) -> None:
    """``data`` at ``how['path']`` of ``fh``, stored as ``how`` says (a link to ``other``)."""
    dtype = data.dtype if data.dtype.kind == "b" else data.dtype.newbyteorder(how["order"])
    target = other if how["linked"] else fh
    name = how["path"]
    target.create_dataset(name, data=data, dtype=dtype, chunks=how["chunks"], **how["filters"])
    if how["linked"]:
        fh[name] = h5py.ExternalLink(Path(other.filename).name, "/" + name)


def _outcome(path: Path, x: str, y: str) -> tuple[str, object]:
    """("ok", block) or ("error", its message with the file name taken out)."""
    try:
        return "ok", reader.read_block(str(path), x, y, SerialComm(), Log())
    except LeptonError as exc:
        return "error", str(exc).replace(str(path), "FILE")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=cases())
def test_every_layout_reads_the_values_of_the_plain_file(scratch, case):
    rng = np.random.default_rng(case["seed"])
    X = _values(rng, case["x_dtype"], case["x_shape"], case["bad"])
    y = _values(rng, case["y_dtype"], case["y_shape"], False)
    work = Path(tempfile.mkdtemp(dir=scratch))
    direct = reader.DIRECT_READ
    try:
        plain, stored = work / "plain.h5", work / "stored.h5"
        with h5py.File(plain, "w") as fh:
            fh.create_dataset("X", data=X)
            fh.create_dataset("y", data=y)
        with h5py.File(stored, "w") as fh, h5py.File(work / "other.h5", "w") as other:
            fh.create_dataset("pad", data=np.arange(4_000.0))  # linked offsets land in here
            _write(fh, other, X, case["x"])
            _write(fh, other, y, case["y"])
        reader.DIRECT_READ = case["direct"]
        want = _outcome(plain, "X", "y")
        got = _outcome(stored, case["x"]["path"], case["y"]["path"])
        info = reader.inspect(str(stored), case["x"]["path"], case["y"]["path"])
    finally:
        reader.DIRECT_READ = direct
        shutil.rmtree(work)

    # float32 and float64 features are kept (in either byte order); every other type is float32
    feature = np.dtype(np.float64 if X.dtype.kind == "f" and X.dtype.itemsize == 8 else np.float32)
    # A direct read is allowed exactly where its bytes are provably the data set's own.
    plainly = {"chunks": None, "filters": {}, "linked": False}
    for how, dtype, offset, want_type in (
        (case["x"], X.dtype, info.x_offset, feature),
        (case["y"], y.dtype, info.y_offset, np.dtype(np.float64)),
    ):
        provable = all(how[k] == v for k, v in plainly.items()) and (
            dtype == want_type and (how["order"] == "<" or dtype.itemsize == 1)
        )
        assert (offset is not None) == provable, (how, dtype, offset)

    if case["bad"] and X.dtype.kind == "f":
        assert want[0] == got[0] == "error" and got[1] == want[1], (want, got)
        assert "rows hold NaN or Inf" in got[1]
        return
    assert want[0] == got[0] == "ok", (want, got)
    ref, block = want[1], got[1]
    n = case["x_shape"][0]
    assert block.X.dtype == ref.X.dtype == feature and block.X.shape == (n, X.size // n)
    assert block.X.tobytes() == ref.X.tobytes() == X.reshape(n, -1).astype(feature).tobytes()
    assert block.y.dtype == np.float64 and block.y.shape == (n,)
    assert block.y.tobytes() == ref.y.tobytes() == y.reshape(n).astype(np.float64).tobytes()


# ---- real 2-rank training runs ------------------------------------------------------------------
def _train(tmp_path: Path, data: Path, name: str) -> tuple[bytes, dict]:
    cfg = write_config(
        tmp_path / f"{name}.toml",
        {
            "data": {"train": str(data), "validation_fraction": 0.2, "scale": "zscore"},
            "model": {"kind": "mlp", "hidden": [6], "activation": "tanh"},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 2, "batch_size": 64},
            "comm": {"reproducible": True},
            "output": {"dir": str(tmp_path / name), "plot": False},
        },
    )
    ok(lepton(2, "train", cfg, timeout=240))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return read_params(tmp_path / name / "model.h5").tobytes(), results["metrics"]


def test_training_on_linked_and_virtual_data_equals_training_on_the_plain_file(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(1_500, 5)).astype(np.float32)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(np.float64)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as fh:
        fh.create_dataset("X", data=X)
        fh.create_dataset("y", data=y)
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as fh:
        fh.create_dataset("pad", data=np.full(20_000, 7.0))  # the linked offsets land in here
        fh["X"] = h5py.ExternalLink("plain.h5", "/X")
        fh["y"] = h5py.ExternalLink("plain.h5", "/y")
    virtual = tmp_path / "virtual.h5"
    with h5py.File(virtual, "w") as fh:  # HDF5 refuses parallel (mpio) reads of these
        for name, data, shape in (("X", X, X.shape), ("y", y, (y.size, 1))):  # a column y
            layout = h5py.VirtualLayout(shape=shape, dtype=data.dtype)
            layout[:] = h5py.VirtualSource("plain.h5", name, shape=data.shape)
            fh.create_virtual_dataset(name, layout)
    before = snapshot(plain, linked, virtual)
    params, metrics = _train(tmp_path, plain, "plain")
    for data in (linked, virtual):
        got_params, got_metrics = _train(tmp_path, data, data.stem)
        assert got_params == params, data.name
        assert got_metrics == metrics, data.name
    assert_unchanged(before, plain, linked, virtual)
    assert not leftover_temporaries(tmp_path)

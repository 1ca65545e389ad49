"""Direct reads of chunked data sets (``chunk_read``) give h5py's bits for every chunk layout.

Random shapes, chunk shapes, stored types, filter pipelines and row blocks (starting and ending
mid-chunk, partial edge chunks, chunks that split columns, chunks never written) are read with
``read_rows`` and compared byte for byte with h5py's read of the same rows cast to the read type.
A filter the chunk's filter mask says was skipped is skipped when decoding; chunks that cannot be
proved right (a bad checksum) go through h5py.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data import chunk_read, reader
from lepton_hpc.errors import DataError, LeptonError
from lepton_hpc.log import Log

PIPELINES = {
    "none": {},
    "gzip1": {"compression": "gzip", "compression_opts": 1},
    "gzip9": {"compression": "gzip", "compression_opts": 9},
    "shuffle+gzip": {"compression": "gzip", "shuffle": True},
    "shuffle": {"shuffle": True},
    "fletcher32": {"fletcher32": True},
    "shuffle+gzip+fletcher32": {"compression": "gzip", "shuffle": True, "fletcher32": True},
    "lzf": {"compression": "lzf"},
    "shuffle+lzf+fletcher32": {"compression": "lzf", "shuffle": True, "fletcher32": True},
}
UNCHECKED = {"shuffle", "lzf"}  # their partial edge chunks go through h5py
# stored type -> read type (features: float32 unless float64; targets: float64)
STORED = {"f4": "f4", "f8": "f8", "f2": "f4", "i1": "f4", "i2": "f4", "u2": "f4", "i8": "f8"}


def _values(rng, dtype: np.dtype, shape):
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    out = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)
    return out.astype(dtype)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 400))
    d = draw(st.one_of(st.none(), st.integers(1, 9)))
    shape = (n,) if d is None else (n, d)
    start = draw(st.integers(0, n - 1))
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "shape": shape,
        "chunks": tuple(draw(st.integers(1, s)) for s in shape),
        "dtype": draw(st.sampled_from(list(STORED))),
        "pipeline": draw(st.sampled_from(list(PIPELINES))),
        "start": start,
        "stop": draw(st.integers(start + 1, n)),
        "unwritten": draw(st.integers(0, 4)) == 0,  # some chunks never written: fill values
        "threads": draw(st.sampled_from([1, 3])),
        "nonfinite": draw(st.booleans()),  # NaN and Inf in some rows (float types)
    }


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("chunks")


@settings(
    max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=cases())
def test_chunked_reads_equal_h5py_bitwise(scratch, case):
    rng = np.random.default_rng(case["seed"])
    stored = np.dtype(case["dtype"])
    data = _values(rng, stored, case["shape"])
    if stored.kind == "f" and case["nonfinite"]:
        data.flat[rng.integers(data.size, size=3)] = [np.nan, np.inf, -np.inf]
    path = scratch / "c.h5"
    with h5py.File(path, "w") as fh:
        kw = PIPELINES[case["pipeline"]]
        if case["unwritten"]:
            ds = fh.create_dataset(
                "X", shape=data.shape, dtype=stored, chunks=case["chunks"], fillvalue=7, **kw
            )
            rows = rng.random(data.shape[0]) < 0.5
            ds[rows] = data[rows]
        else:
            fh.create_dataset("X", data=data, chunks=case["chunks"], **kw)
    want_type = np.dtype(STORED[case["dtype"]])
    a, b = case["start"], case["stop"]
    width = data.shape[1] if data.ndim == 2 else 1
    h5py_calls = []
    real = chunk_read._read_with_h5py
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], want_type, os.stat(path))
        want = fh["X"][a:b].astype(want_type).reshape(b - a, width)
    assert lay is not None
    out = np.full((b - a, width), 99, dtype=want_type)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            chunk_read,
            "_read_with_h5py",
            lambda *args: (h5py_calls.append(args[-1]), real(*args))[1],
        )
        flags = np.zeros(b - a, dtype=bool)
        chunk_read.read_rows(str(path), "X", lay, a, b, out, case["threads"], flags=flags)
    assert out.dtype == want.dtype and out.tobytes() == want.tobytes()
    assert np.array_equal(flags, ~np.isfinite(want).all(axis=1))
    if not case["unwritten"] and case["pipeline"] not in UNCHECKED:
        assert not h5py_calls  # every chunk was read directly


def test_a_chunk_whose_filter_was_skipped_is_decoded_without_it(tmp_path, monkeypatch):
    X = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    path = tmp_path / "mask.h5"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("X", data=X, chunks=(10, 3), compression="gzip")
        raw = (X[10:20] * 2).tobytes()  # stored raw: the deflate filter (bit 0) was skipped
        ds.id.write_direct_chunk((10, 0), raw, filter_mask=1)
    with h5py.File(path, "r") as fh:
        want = fh["X"][:]
        assert fh["X"].id.get_chunk_info_by_coord((10, 0)).filter_mask == 1
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
    assert want[12, 1] == X[12, 1] * 2
    monkeypatch.setattr(chunk_read, "_read_with_h5py", lambda *a: pytest.fail("read by h5py"))
    out = np.empty_like(X)
    chunk_read.read_rows(str(path), "X", lay, 0, 40, out, 2)
    assert out.tobytes() == want.tobytes()


def _corrupt_chunk(path: Path, coord) -> None:
    with h5py.File(path, "r") as fh:
        info = fh["X"].id.get_chunk_info_by_coord(coord)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 1)
        byte = f.read(1)
        f.seek(info.byte_offset + 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_bad_fletcher32_checksum_is_an_error_naming_the_data_set(tmp_path):
    X = np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32)
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(25, 4), fletcher32=True)
    _corrupt_chunk(path, (50, 0))
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
    out = np.empty((60, 4), dtype=np.float32)
    chunk_read.read_rows(str(path), "X", lay, 0, 50, out[:50], 2)  # rows before it read fine
    assert out[:50].tobytes() == X[:50].tobytes()
    with pytest.raises(DataError, match="X' cannot be read"):
        chunk_read.read_rows(str(path), "X", lay, 40, 100, out, 2)


def test_layouts_that_cannot_be_proved_are_left_to_h5py(tmp_path):
    X = np.arange(60.0, dtype=np.float32).reshape(20, 3)
    path = tmp_path / "others.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("big", data=X.astype(">f4"), chunks=(5, 3))
        fh.create_dataset("lzf", data=X, chunks=(5, 3), compression="lzf")
        fh.create_dataset("contiguous", data=X)
        fh.create_dataset("i4", data=X.astype("i4"), chunks=(5, 3))  # int32 -> float32 rounds
        fh.create_dataset("bool", data=X > 3, chunks=(5, 3))
        fh.create_dataset("ok", data=X, chunks=(5, 3), compression="gzip", shuffle=True)
    st_ = os.stat(path)
    with h5py.File(path, "r") as fh:
        got = {k: chunk_read.layout(fh[k], np.dtype(np.float32), st_) for k in fh}
    assert {k for k, v in got.items() if v is not None} == {"ok", "lzf"}


def test_read_block_uses_the_chunk_path_and_matches_the_contiguous_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3_000, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=(3_000, 1)).astype(np.int16)
    plain, packed = tmp_path / "plain.h5", tmp_path / "packed.h5"
    with h5py.File(plain, "w") as fh:
        fh["X"], fh["y"] = X, y
    with h5py.File(packed, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(700, 2), compression="gzip", shuffle=True)
        fh.create_dataset("y", data=y, chunks=(512, 1), compression="gzip", fletcher32=True)
    monkeypatch.setattr(
        chunk_read, "_read_with_h5py", lambda *a: pytest.fail("h5py read a provable chunk")
    )
    want = reader.read_block(str(plain), "X", "y", SerialComm(), Log())
    got = reader.read_block(str(packed), "X", "y", SerialComm(), Log())
    assert got.info.x_chunks is not None and got.info.y_chunks is not None
    assert got.X.tobytes() == want.X.tobytes() and got.y.tobytes() == want.y.tobytes()
    assert got.X.ctypes.data % 64 == 0


@pytest.mark.parametrize("chunks", [(64, 3), (64, 4), (1, 1)])
def test_nonfinite_rows_in_chunks_are_found(tmp_path, chunks):
    X = np.ones((300, 4), dtype=np.float64)
    X[123, 2] = np.nan
    path = tmp_path / "nan.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=chunks, compression="gzip")
    with pytest.raises(LeptonError, match="first: row 123"):
        reader.read_block(str(path), "X", None, SerialComm(), Log())
    block = reader.read_block(str(path), "X", None, SerialComm(), Log(), nonfinite="drop")
    assert block.n == 299 and 123 not in block.rows

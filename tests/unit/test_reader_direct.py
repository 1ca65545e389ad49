"""The direct read path (threaded preads of contiguous data sets) gives exactly what h5py reads,
and every layout it cannot read (chunked, compressed, big-endian, other dtypes) goes through h5py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data import reader
from lepton_hpc.errors import DataError
from lepton_hpc.log import Log


def _read(path, y="y", direct=True, monkeypatch=None):
    monkeypatch.setattr(reader, "DIRECT_READ", direct)
    return reader.read_block(str(path), "X", y, SerialComm(), Log(0, 1))


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_direct_equals_h5py_on_uneven_pieces(tmp_path, monkeypatch, dtype, threads):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(10_007, 5)).astype(dtype)
    y = rng.normal(size=(10_007, 2))
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("pad", data=np.arange(13))  # X does not start at the first byte
        fh.create_dataset("X", data=X)
        fh.create_dataset("y", data=y)
    info = reader.inspect(str(path), "X", "y")
    assert info.x_offset is not None and info.y_offset is not None
    monkeypatch.setattr(reader, "MIN_PIECE_BYTES", 4096)  # many pieces, the last one short
    monkeypatch.setattr(reader, "_reader_threads", lambda comm: threads)
    direct = _read(path, monkeypatch=monkeypatch)
    via_h5py = _read(path, direct=False, monkeypatch=monkeypatch)
    assert direct.X.dtype == via_h5py.X.dtype == np.dtype(dtype).newbyteorder("=")
    assert np.array_equal(direct.X, X) and np.array_equal(via_h5py.X, X)
    assert np.array_equal(direct.y, y) and np.array_equal(via_h5py.y, y)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunks": (100, 4)},
        {"chunks": (100, 4), "compression": "gzip"},
        {"dtype": ">f4"},
        {"dtype": "<i4"},
    ],
    ids=["chunked", "gzip", "big-endian", "int32"],
)
def test_layouts_it_cannot_read_go_through_h5py(tmp_path, monkeypatch, kwargs):
    X = np.arange(4_000, dtype=np.float64).reshape(1_000, 4)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, **kwargs)
        fh.create_dataset("y", data=np.arange(1_000, dtype=np.float32))
    info = reader.inspect(str(path), "X", "y")
    assert info.x_offset is None and info.y_offset is None  # y is float32: read and widened
    block = _read(path, monkeypatch=monkeypatch)
    assert np.array_equal(block.X, X) and np.array_equal(block.y, np.arange(1_000))


def test_nan_found_by_the_direct_read_names_the_first_bad_row(tmp_path, monkeypatch):
    X = np.ones((50_000, 8), dtype=np.float32)
    X[31_234, 5] = np.nan
    X[40_000] = np.finfo(np.float32).max  # finite: its row sum overflows, it is not flagged
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X)
        fh.create_dataset("y", data=np.zeros(50_000))
    monkeypatch.setattr(reader, "MIN_PIECE_BYTES", 4096)
    with pytest.raises(Exception, match=r"1 rows hold NaN or Inf \(first: row 31234\)"):
        _read(path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("y_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("direct", [True, False])
def test_nonfinite_targets_are_found_by_either_read(tmp_path, monkeypatch, direct, y_dtype):
    """y is screened while it is read (direct, float64) or after (h5py; and float32 y, read by
    h5py beside a direct X): the same rows, the same error, and data.nonfinite = "drop" drops
    exactly those rows."""
    X = np.ones((9_000, 4), dtype=np.float32)
    X[100, 2] = np.inf
    y = np.zeros((9_000, 2))
    y[[7, 4_321], [1, 0]] = (np.nan, -np.inf)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X)
        fh.create_dataset("y", data=y.astype(y_dtype))
    monkeypatch.setattr(reader, "MIN_PIECE_BYTES", 4096)
    with pytest.raises(Exception, match=r"3 rows hold NaN or Inf \(first: row 7\)"):
        _read(path, direct=direct, monkeypatch=monkeypatch)
    monkeypatch.setattr(reader, "DIRECT_READ", direct)
    block = reader.read_block(str(path), "X", "y", SerialComm(), Log(0, 1), nonfinite="drop")
    assert block.n == 8_997 and np.isfinite(block.y).all() and np.isfinite(block.X).all()
    assert not np.isin([7, 100, 4_321], block.rows).any()


def test_pread_of_a_file_shorter_than_the_data_is_a_data_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(np.arange(10, dtype=np.float64).tobytes())
    for screen in (False, True):  # the screened read's Numba loop hands the end to os.preadv
        out = np.empty((4, 3))
        with pytest.raises(DataError, match="ends before the data"):
            reader.pread_rows(str(path), 0, 0, out, 2, screen=screen)


def test_screened_read_of_an_unreadable_descriptor_is_an_os_error(tmp_path):
    """A pread error in the Numba loop is raised by the os.preadv retry, with its errno."""
    path = tmp_path / "dir"
    path.mkdir()  # open() of a directory works, pread() of it fails with EISDIR
    with pytest.raises(IsADirectoryError):
        reader.pread_rows(str(path), 0, 0, np.empty((4, 3)), 1, screen=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_screened_read_finds_exactly_the_bad_rows_at_every_boundary(tmp_path, monkeypatch, dtype):
    """Bad values at the edges of the screen's 64-row groups, of the screened reads and of the
    pieces are all found; huge finite rows (whose group sum overflows) are not flagged."""
    m, d = 5_003, 6
    X = np.random.default_rng(2).normal(size=(m, d)).astype(dtype)
    for r in (0, 63, 64, 127, 1_000, 1_001, 2_047, 4_999, m - 1):
        X[r, r % d] = (np.nan, np.inf, -np.inf)[r % 3]
    X[200:264] = np.finfo(dtype).max  # a whole finite group that overflows its sum
    X[300, 2] = -np.finfo(dtype).max
    path = tmp_path / "x.bin"
    path.write_bytes(X.tobytes())
    monkeypatch.setattr(reader, "MIN_PIECE_BYTES", 7 * 1024)  # uneven pieces ...
    monkeypatch.setattr(reader, "SCREEN_READ_BYTES", 3 * 1024)  # ... read in uneven steps
    for threads in (1, 3):
        out = np.empty_like(X)
        bad = reader.pread_rows(str(path), 0, 0, out, threads, screen=True)
        assert np.array_equal(out, X, equal_nan=True)
        assert np.array_equal(bad, ~np.isfinite(X).all(axis=1))
    assert np.array_equal(reader.nonfinite_rows(X), ~np.isfinite(X).all(axis=1))

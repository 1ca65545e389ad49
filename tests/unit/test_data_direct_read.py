"""The direct read path (threaded preads of contiguous data sets) gives exactly what h5py reads,
and every layout it cannot read (chunked, compressed, big-endian, other dtypes) goes through h5py."""

from __future__ import annotations

import dataclasses
import itertools
import os

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lepton_hpc.kernels import native

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data import direct_read, reader
from lepton_hpc.errors import DataError, LeptonError
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
    monkeypatch.setattr(direct_read, "MIN_PIECE_BYTES", 4096)  # many pieces, the last one short
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
    monkeypatch.setattr(direct_read, "MIN_PIECE_BYTES", 4096)
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
    monkeypatch.setattr(direct_read, "MIN_PIECE_BYTES", 4096)
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


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "fallback"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_screened_read_finds_exactly_the_bad_rows_at_every_boundary(
    tmp_path, monkeypatch, dtype, native_on
):
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
    if not native_on:  # without the tuned native code: whole pieces by os.preadv, then screened
        monkeypatch.setattr(native, "supported", lambda: (False, "test"))
    monkeypatch.setattr(direct_read, "MIN_PIECE_BYTES", 7 * 1024)  # uneven pieces ...
    monkeypatch.setattr(direct_read, "SCREEN_READ_BYTES", 3 * 1024)  # ... read in uneven steps
    for threads in (1, 3):
        out = np.empty_like(X)
        bad = reader.pread_rows(str(path), 0, 0, out, threads, screen=True)
        assert np.array_equal(out, X, equal_nan=True)
        assert np.array_equal(bad, ~np.isfinite(X).all(axis=1))
    assert np.array_equal(reader.nonfinite_rows(X), ~np.isfinite(X).all(axis=1))


# ---- only bytes proven to be in the opened file are read directly --------------------------------
def _store(fh, name, data, layout, tmp_path):
    """``data`` as data set ``name`` of ``fh`` in ``layout``."""
    if layout == "external-link":
        with h5py.File(tmp_path / f"other-{name}.h5", "w") as other:
            other.create_dataset("pad", data=np.arange(1_000.0))  # offsets differ from fh's
            other.create_dataset(name, data=data)
        fh[name] = h5py.ExternalLink(f"other-{name}.h5", "/" + name)
    elif layout == "virtual":
        with h5py.File(tmp_path / f"src-{name}.h5", "w") as src:
            src.create_dataset(name, data=data)
        vl = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        vl[:] = h5py.VirtualSource(f"src-{name}.h5", name, shape=data.shape)
        fh.create_virtual_dataset(name, vl)
    elif layout == "external-raw":
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(np.ascontiguousarray(data).tobytes())
        fh.create_dataset(
            name, shape=data.shape, dtype=data.dtype, external=[(raw, 0, h5py.h5f.UNLIMITED)]
        )
    elif layout == "compact":
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple(data.shape)
        tid = h5py.h5t.py_create(data.dtype)
        dsid = h5py.h5d.create(fh.id, name.encode(), tid, space, dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))
    elif layout == "soft-link":
        fh.create_dataset(f"real-{name}", data=data)
        fh[name] = h5py.SoftLink(f"/real-{name}")
    else:
        kwargs = {
            "chunked": {"chunks": (7, *data.shape[1:])},
            "gzip": {"compression": "gzip"},
            "shuffle-gzip": {"compression": "gzip", "shuffle": True},
            "lzf": {"compression": "lzf"},
            "big-endian": {"dtype": data.dtype.newbyteorder(">")},
        }[layout]
        fh.create_dataset(name, data=data, **kwargs)


LAYOUTS = [
    "external-link",
    "virtual",
    "external-raw",
    "compact",
    "soft-link",
    "chunked",
    "gzip",
    "shuffle-gzip",
    "lzf",
    "big-endian",
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("direct", [True, False])
def test_every_layout_reads_the_bits_of_the_plain_file(tmp_path, monkeypatch, layout, direct):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 4)).astype(np.float32)  # compact data sets stay under 64 KiB
    y = rng.normal(size=300)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("pad", data=np.arange(5_000.0))  # linked offsets land inside this file
        _store(fh, "X", X, layout, tmp_path)
        _store(fh, "y", y, layout, tmp_path)
    info = reader.inspect(str(path), "X", "y")
    if layout == "soft-link":  # the same file, contiguous: proven, read directly
        assert info.x_offset is not None and info.y_offset is not None
        assert info.identity == reader.file_identity(path.stat())
    else:
        assert info.x_offset is None and info.y_offset is None
        chunked = layout in ("chunked", "gzip", "shuffle-gzip", "lzf")  # chunks read directly
        assert (info.x_chunks is not None) == chunked and (info.y_chunks is not None) == chunked
        assert (info.identity is not None) == chunked
    block = _read(path, direct=direct, monkeypatch=monkeypatch)
    assert block.X.dtype == np.float32 and block.X.tobytes() == X.tobytes()
    assert block.y.dtype == np.float64 and block.y.tobytes() == y.tobytes()


def test_the_offset_of_an_externally_linked_data_set_points_into_the_other_file(tmp_path):
    """The control for the external-link case: the linked data set's offset is a real offset in
    the other file, and the bytes there in the opened file are not its values."""
    X = np.arange(1.0, 401.0).reshape(100, 4)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("pad", data=np.full(2_000, -1.0))
        _store(fh, "X", X, "external-link", tmp_path)
    with h5py.File(path, "r") as fh:
        offset = fh["X"].id.get_offset()
    assert offset is not None and offset + X.nbytes <= path.stat().st_size
    assert path.read_bytes()[offset : offset + X.nbytes] != X.tobytes()
    assert (tmp_path / "other-X.h5").read_bytes()[offset : offset + X.nbytes] == X.tobytes()
    assert reader.inspect(str(path), "X", None).x_offset is None


def _plain(tmp_path, n=2_000):
    X = np.random.default_rng(4).normal(size=(n, 3))
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X)
        fh.create_dataset("y", data=np.zeros(n))
    return path, X


def test_a_file_rewritten_after_inspection_is_a_data_error(tmp_path, monkeypatch):
    path, _ = _plain(tmp_path)
    info = reader.inspect(str(path), "X", "y")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "rewritten"
    monkeypatch.setattr(reader, "inspect_shared", lambda *a: info)
    with pytest.raises(LeptonError, match=rf"'{path}' changed while it was being read") as err:
        _read(path, monkeypatch=monkeypatch)
    assert err.value.exit_code == DataError.exit_code
    out = np.empty((10, 3))
    with pytest.raises(DataError, match="changed while it was being read"):
        reader.pread_rows(str(path), info.x_offset, 0, out, 1, identity=info.identity)


def test_the_same_file_under_another_device_number_is_still_read_directly(tmp_path, monkeypatch):
    """Nodes mounting one network file system see one inode under their own device numbers:
    the direct read stays (inode, size and modification time prove the file)."""
    path, X = _plain(tmp_path)
    info = reader.inspect(str(path), "X", "y")
    other = dataclasses.replace(info, identity=(info.identity[0] + 1, *info.identity[1:]))
    monkeypatch.setattr(reader, "inspect_shared", lambda *a: other)
    preads = []
    real = reader.pread_rows
    monkeypatch.setattr(reader, "pread_rows", lambda *a, **k: preads.append(1) or real(*a, **k))
    block = _read(path, monkeypatch=monkeypatch)
    assert preads and block.X.tobytes() == X.tobytes()


# ---- the shapes users write --------------------------------------------------------------------
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "gzip"])
def test_a_column_of_labels_is_one_target_and_a_1d_x_one_feature(
    tmp_path, monkeypatch, direct, layout
):
    x = np.arange(500, dtype=np.float64) / 7
    y = (np.arange(500) % 3 == 0).astype(np.float64)
    kw = {"compression": "gzip"} if layout == "gzip" else {}
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=x, **kw)
        fh.create_dataset("y", data=y[:, None], **kw)
        fh.create_dataset("y2", data=np.stack([y, 2 * y], axis=1), **kw)
    info = reader.inspect(str(path), "X", "y")
    assert (info.n_rows, info.n_features, info.y_shape, info.x_ndim) == (500, 1, (500,), 1)
    block = _read(path, direct=direct, monkeypatch=monkeypatch)
    assert block.X.shape == (500, 1) and block.X.tobytes() == x.tobytes()
    assert block.y.shape == (500,) and block.y.tobytes() == y.tobytes()
    two = reader.read_block(str(path), "X", "y2", SerialComm(), Log(0, 1))
    assert two.y.shape == (500, 2) and np.array_equal(two.y[:, 1], 2 * y)


@pytest.mark.parametrize(
    "labels",
    [
        np.arange(40) % 2 == 0,
        (np.arange(40) % 3).astype(np.int64),
        (np.arange(40) % 3).astype(np.uint8)[:, None],
        (np.arange(40) % 2 == 1)[:, None],
    ],
    ids=["bool", "int64", "uint8-column", "bool-column"],
)
def test_integer_and_boolean_labels_are_read_as_float(tmp_path, labels):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=np.ones((40, 2), dtype=np.float32))
        fh.create_dataset("y", data=labels)
    block = reader.read_block(str(path), "X", "y", SerialComm(), Log(0, 1))
    assert block.y.dtype == np.float64 and block.y.shape == (40,)
    assert np.array_equal(block.y, labels.reshape(40).astype(np.float64))


def test_big_endian_float64_features_stay_float64(tmp_path):
    X = np.array([[1 + 2**-40, 3.0], [np.pi, -np.e]])
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, dtype=">f8")
    block = reader.read_block(str(path), "X", None, SerialComm(), Log(0, 1))
    assert block.X.dtype == np.float64 and block.X.tobytes() == X.tobytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda fh: fh.create_dataset("X", data=np.zeros((4, 2, 2))), "must be 2-D .* or 1-D"),
        (
            lambda fh: fh.create_dataset("y", data=np.zeros((6, 0))),
            "'y' has shape|holds no targets",
        ),
        (lambda fh: fh.create_group("y"), r":y' is a group, not a data set"),
        (
            lambda fh: fh.__setitem__("y", h5py.ExternalLink("gone.h5", "/y")),
            "has no data set 'y'|cannot be opened",
        ),
    ],
    ids=["3-d-x", "no-target-columns", "group", "dangling-link"],
)
def test_shapes_that_cannot_be_read_are_data_errors(tmp_path, make, message):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        make(fh)
        if "X" not in fh:
            fh.create_dataset("X", data=np.zeros((6, 2)))
    with pytest.raises(DataError, match=message):
        reader.inspect(str(path), "X", "y")


def _mapped_file(tmp_path, rows=40_000, d=7):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(rows, d)).astype(np.float32)
    y = rng.normal(size=rows)
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("pad", data=np.arange(13))  # X does not start at the first byte
        fh["X"], fh["y"] = X, y
    return path, X, y


def test_mapped_rows_are_the_stored_rows_and_read_only(tmp_path):
    path, X, y = _mapped_file(tmp_path)
    before = path.read_bytes()
    info = reader.inspect(str(path), "X", "y")
    maps = {}
    for a, b in ((0, 1), (5, 40_000), (12_345, 23_456), (39_999, 40_000)):
        piece = reader.map_range(info, a, b, True, np.float32, 1, maps)
        Xv, yv = piece.X, piece.y
        assert np.array_equal(Xv, X[a:b]) and np.array_equal(yv.reshape(-1), y[a:b])
        with pytest.raises(ValueError, match="read-only"):
            Xv[0, 0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            yv[0] = 1.0
        piece.drop()  # its pages are let go; the views read the file's bytes again
        assert np.array_equal(Xv, X[a:b]) and np.array_equal(yv.reshape(-1), y[a:b])
        del Xv, yv, piece
    assert len(maps) == 1 and _file_mappings(path) == 1  # one mapping of the file for all
    maps[str(path)].close()
    assert path.read_bytes() == before
    assert reader.map_range(info, 0, 10, True, np.float64, 1) is None  # stored as float32
    assert reader.map_range(info, 0, 10, False, np.float32, 1) is None  # not read directly


def test_mapping_a_file_rewritten_after_inspection_is_a_data_error(tmp_path):
    path, _X, _ = _mapped_file(tmp_path)
    info = reader.inspect(str(path), "X", "y")
    with h5py.File(path, "a") as fh:
        fh["X"][0, 0] = 1.0
    with pytest.raises(DataError, match="changed"):
        reader.map_range(info, 0, 10, True, np.float32, 1)


@settings(max_examples=200, deadline=None)
@given(
    offset=st.integers(0, 5 << 20),
    start=st.integers(0, 10**6),
    rows=st.integers(1, 10**6),
    row=st.sampled_from([4, 12, 32, 128, 4096]),
    unit=st.sampled_from([1, 1024]),
    spans=st.integers(1, 4),
)
def test_mapped_pieces_cover_the_rows_from_2_mib_edges(offset, start, rows, row, unit, spans):
    """Pieces are contiguous, cover the rank's rows, and each starts at the first whole unit
    (global block) at or after a 2 MiB edge of the file, ``piece`` bytes apart."""
    start = start // unit * unit
    stop = start + rows
    info = reader.DataInfo("f", "X", None, stop, row // 4, "<f4", None, x_offset=offset)
    piece = spans * reader.MAP_ALIGN
    bounds = reader.mapped_bounds(info, start, stop, unit, piece)
    assert bounds[0][0] == start and bounds[-1][1] == stop
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(bounds))
    assert all(a < b for a, b in bounds)
    first = (offset + start * row) // reader.MAP_ALIGN * reader.MAP_ALIGN
    for a, _ in bounds[1:]:
        assert a % unit == 0
        at = offset + a * row
        edge = first + (at - first) // piece * piece  # the last edge at or before the piece
        assert offset + (a - unit) * row < edge <= at


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages only can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _file_mappings(path) -> int:
    """Mappings of ``path`` in this process (lines of /proc/self/maps)."""
    with open("/proc/self/maps") as fh:
        return sum(line.rstrip().endswith(str(path)) for line in fh)


def test_cached_tells_cached_pages_without_reading_them(tmp_path):
    """``cached`` (Linux's cachestat) sees the page cache without reading (a probing read would
    start the kernel's read-ahead); any range of a dropped file is not cached, and a range read
    since is."""
    path, X, _ = _mapped_file(tmp_path)
    info = reader.inspect(str(path), "X", "y")
    fd = os.open(path, os.O_RDONLY)
    try:
        nbytes = X.nbytes
        path.read_bytes()
        if not direct_read.cached(fd, info.x_offset, nbytes):
            pytest.skip("this kernel has no cachestat (Linux 6.5)")
        _evict(path)
        if direct_read.cached(fd, info.x_offset, nbytes):
            pytest.skip("the page cache of this file system cannot be dropped")
        assert not direct_read.cached(fd, info.x_offset, nbytes)  # asking read nothing
        row = X.shape[1] * 4
        os.pread(fd, 29_000 * row, info.x_offset + 1000 * row)
        assert direct_read.cached(fd, info.x_offset + 1000 * row, 29_000 * row)
        assert not direct_read.cached(fd, info.x_offset, nbytes)
        assert direct_read.cached(fd, 0, 0)
    finally:
        os.close(fd)


def _file_rss(path) -> int:
    """Bytes of ``path``'s pages mapped into this process (the Rss of its mappings)."""
    total, mine = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                mine = line.rstrip().endswith(str(path))
            elif mine and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("cold", [False, True])
def test_a_streamed_pass_maps_at_most_two_pieces(tmp_path, cold):
    """The pieces of a mapped stream are a buffer each, mapped when the caller asks for them:
    the one just mapped and the caller's last are all the process maps of the file at any time
    (X and y each, measured as the resident pages of the file's mapping), whether the pages
    were cached (mapped by the caller's thread) or had to be read first (mapped ahead by the
    read-ahead thread). The file is mapped once. A piece kept past its time still holds the
    stored rows (its pages are mapped again when read)."""
    from lepton_hpc.config import DataConfig
    from lepton_hpc.data import stream as stream_mod

    path, X, y = _mapped_file(tmp_path, rows=1_600_000, d=8)  # 51 MB of rows, 13 MB of targets
    cfg = DataConfig(train=str(path), stream=True, buffer_mb=3)  # pieces of 2 MiB
    stream = stream_mod.RowStream(cfg, 1, SerialComm())
    stream.fit()
    assert stream.map and len(stream.bounds) > 20
    x_piece = stream.piece_rows * X.shape[1] * 4
    assert x_piece >= reader.MAP_ALIGN  # 2 MiB of 3 MiB (rows, targets, flags)
    # two pieces, and the 2 MiB spans at their ends that a piece maps whole (three an array)
    bound = 2 * stream.piece_rows * (X.shape[1] * 4 + 8) + 6 * reader.MAP_ALIGN
    assert bound < (X.nbytes + y.nbytes) / 3
    for _ in range(2):
        if cold:
            _evict(path)
        rows, kept, resident = 0, [], []
        for part, _ in stream.passes():
            resident.append(_file_rss(path))
            assert _file_mappings(path) == 1
            assert np.array_equal(part.X, X[part.start : part.start + part.n])
            rows += part.n
            kept.append(part)
        assert rows == X.shape[0]
        assert 0 < max(resident) <= bound, (max(resident), bound)
    for part in kept:  # every piece's pages were let go but the last two's
        assert np.array_equal(part.X, X[part.start : part.start + part.n])
        assert np.array_equal(part.y.reshape(-1), y[part.start : part.start + part.n])
    assert _file_rss(path) > bound  # reading them mapped their pages again
    stream.release()
    assert _file_rss(path) == 0

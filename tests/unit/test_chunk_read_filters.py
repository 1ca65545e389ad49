"""lzf and zstd chunks decoded on the rank's threads give h5py's bits; a missing plugin is one line.

The LZF decoder is checked against the chunks h5py's own filter writes (read raw with
``read_direct_chunk``): compressible and incompressible data (stored unfiltered, its filter-mask
bit set), and never reads or writes out of bounds on damaged input. ``read_rows`` on lzf,
shuffle+lzf, shuffle+lzf+fletcher32 and (with hdf5plugin) zstd files equals h5py's read byte for
byte, for several stored types, partial edge chunks and row blocks starting mid-chunk; only the
chunks that cannot be proved (partial edge chunks of an unchecked pipeline) go through h5py.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import zlib

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data import chunk_read, lzf, native_codecs, plugin_filters, reader
from lepton_hpc.errors import DataError
from lepton_hpc.log import Log

FAST = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def chunk_bytes(draw):
    """Bytes h5py's lzf filter may meet: runs, repeats at many distances, noise, or a mixture."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 20_000))
    kind = draw(st.sampled_from(["noise", "runs", "repeats", "mixed", "floats"]))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if kind == "runs":
        return np.repeat(rng.integers(0, 4, n, dtype=np.uint8), rng.integers(1, 300, n))[
            :n
        ].tobytes()
    if kind == "repeats":  # a pattern repeated at a distance up to LZF's 8 KiB window and past
        unit = rng.integers(0, 256, int(rng.integers(1, 9000)), dtype=np.uint8)
        return np.resize(unit, n).tobytes()
    if kind == "floats":
        return np.round(rng.normal(size=n), 2).astype(np.float32).tobytes()
    parts = [rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8) for _ in range(20)]
    parts += [np.zeros(int(rng.integers(1, 400)), dtype=np.uint8) for _ in range(20)]
    rng.shuffle(parts)
    return np.concatenate(parts)[:n].tobytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("filters")


@FAST
@given(data=chunk_bytes())
def test_lzf_decoder_equals_h5py_filter_on_its_own_chunks(scratch, data):
    path = scratch / "one.h5"
    arr = np.frombuffer(data, dtype=np.uint8)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("b", data=arr, chunks=(arr.size,), compression="lzf")
    with h5py.File(path, "r") as fh:
        mask, raw = fh["b"].id.read_direct_chunk((0,))
    if mask:  # did not shrink: stored as it is, the lzf bit set
        assert mask == 1 and raw == data
        return
    out = lzf.decompress(raw, len(data))
    assert out is not None and out.tobytes() == data
    # one byte more or less is not this chunk
    assert lzf.decompress(raw, len(data) + 1) is None
    if len(data) > 1:
        assert lzf.decompress(raw, len(data) - 1) is None


@FAST
@given(junk=st.binary(min_size=0, max_size=3000), size=st.integers(0, 5000))
def test_lzf_decoder_stays_in_bounds_on_damaged_input(junk, size):
    src = np.frombuffer(junk, dtype=np.uint8)
    guard = np.full(size + 64, 0xAB, dtype=np.uint8)  # bytes past ``out`` must stay untouched
    got = lzf.decompress_into(src, guard[:size])
    assert -1 <= got <= size
    assert (guard[size:] == 0xAB).all()


PIPELINES = {
    "lzf": {"compression": "lzf"},
    "shuffle+lzf": {"compression": "lzf", "shuffle": True},
    "shuffle+lzf+fletcher32": {"compression": "lzf", "shuffle": True, "fletcher32": True},
}
if chunk_read.SZIP in chunk_read.FILTERS and h5py.h5z.filter_avail(h5py.h5z.FILTER_SZIP):
    PIPELINES["szip nn 8"] = {"compression": "szip", "compression_opts": ("nn", 8)}
    PIPELINES["shuffle+szip ec 32+fletcher32"] = {
        "compression": "szip",
        "compression_opts": ("ec", 32),
        "shuffle": True,
        "fletcher32": True,
    }
STORED = {"f4": "f4", "f8": "f8", "f2": "f4", "i2": "f4", "u1": "f4", "i8": "f8"}


def _plugin_pipelines() -> dict:
    """hdf5plugin's filters that are decoded on the rank's threads when their package is
    installed: zstd (zstandard), LZ4 (lz4), Blosc (blosc) with its compressors and shuffles,
    bitshuffle (alone, or with LZ4 or zstd), bzip2 (the standard library's ``bz2``) and Blosc2
    (blosc2)."""
    try:
        import hdf5plugin
    except ImportError:
        return {}
    found = {
        "bzip2": dict(hdf5plugin.BZip2(blocksize=1)),
        "shuffle+bzip2+fletcher32": {**hdf5plugin.BZip2(), "shuffle": True, "fletcher32": True},
    }
    if chunk_read.ZSTD in chunk_read.FILTERS:
        found["zstd"] = dict(hdf5plugin.Zstd(clevel=3))
        found["shuffle+zstd+fletcher32"] = {
            **hdf5plugin.Zstd(),
            "shuffle": True,
            "fletcher32": True,
        }
    if chunk_read.LZ4 in chunk_read.FILTERS:
        found["lz4"] = dict(hdf5plugin.LZ4())
        found["lz4 (blocks of 1000 bytes)+fletcher32"] = {
            **hdf5plugin.LZ4(nbytes=1000),
            "fletcher32": True,
        }
    bitshuffle = hdf5plugin.Bitshuffle
    found["bitshuffle"] = dict(bitshuffle(cname="none"))  # checks nothing, as shuffle
    found["bitshuffle (blocks of 64)+fletcher32"] = {
        **bitshuffle(nelems=64, cname="none"),
        "fletcher32": True,
    }
    if chunk_read.BSHUF_LZ4 in chunk_read.BSHUF_CODECS:
        found["bitshuffle+lz4"] = dict(bitshuffle(cname="lz4"))
    if chunk_read.BSHUF_ZSTD in chunk_read.BSHUF_CODECS:
        found["bitshuffle+zstd (blocks of 256)"] = dict(bitshuffle(nelems=256, cname="zstd"))
    if chunk_read.ZFP in chunk_read.FILTERS:  # float32 and float64 only (lossy but exact:
        # the same zfp code decodes on both paths)
        found["zfp rate 12"] = dict(hdf5plugin.Zfp(rate=12))
        found["zfp accuracy 1e-3"] = dict(hdf5plugin.Zfp(accuracy=1e-3))
        found["zfp reversible+fletcher32"] = {**hdf5plugin.Zfp(reversible=True), "fletcher32": True}
    if chunk_read.BLOSC2 in chunk_read.FILTERS:
        blosc2 = hdf5plugin.Blosc2
        found["blosc2 lz4+shuffle"] = dict(blosc2(cname="lz4", clevel=5, filters=blosc2.SHUFFLE))
        found["blosc2 zstd+bitshuffle"] = dict(blosc2(cname="zstd", filters=blosc2.BITSHUFFLE))
    if chunk_read.BLOSC in chunk_read.FILTERS:
        blosc = hdf5plugin.Blosc
        found["blosc lz4+shuffle"] = dict(blosc(cname="lz4", clevel=5, shuffle=blosc.SHUFFLE))
        found["blosc zstd+bitshuffle"] = dict(blosc(cname="zstd", shuffle=blosc.BITSHUFFLE))
        found["blosc blosclz"] = dict(blosc(cname="blosclz", shuffle=blosc.NOSHUFFLE))
    return found


def _values(rng, dtype: np.dtype, shape, noise: bool):
    """Values of ``dtype``: ``noise`` gives bytes no compressor shrinks (chunks stored raw)."""
    if noise:
        return rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8).view(dtype)[
            ..., 0
        ]
    if dtype.kind in "iu":
        return rng.integers(0, 50, size=shape).astype(dtype)
    return np.round(rng.normal(size=shape), 2).astype(dtype)


def _read(path, want_type, a, b, threads):
    calls = []
    real = chunk_read._read_with_h5py
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], want_type, os.stat(path))
        ref = fh["X"][a:b]
    assert lay is not None
    width = ref.shape[1] if ref.ndim == 2 else 1
    out = np.full((b - a, width), 99, dtype=want_type)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            chunk_read, "_read_with_h5py", lambda *args: (calls.append(args[-1]), real(*args))[1]
        )
        chunk_read.read_rows(str(path), "X", lay, a, b, out, threads)
    return out, ref.astype(want_type).reshape(b - a, width), [t[:2] for c in calls for t in c]


@pytest.mark.parametrize("pipeline", [*PIPELINES, *_plugin_pipelines()])
@pytest.mark.parametrize("dtype", list(STORED))
def test_compressed_chunks_equal_h5py_bitwise(tmp_path, pipeline, dtype):
    if pipeline.startswith("zfp") and dtype not in ("f4", "f8"):
        pytest.skip("ZFP encodes 32- and 64-bit floats and integers only")
    rng = np.random.default_rng(abs(hash((pipeline, dtype))) % 2**32)
    stored = np.dtype(dtype)
    n, d, cr, cc = 1_003, 7, 128, 4  # partial edge chunks in both directions
    X = _values(rng, stored, (n, d), noise=False)
    X[256:384] = _values(rng, stored, (128, d), noise=True)  # these chunks stay unfiltered
    kw = PIPELINES.get(pipeline) or _plugin_pipelines()[pipeline]
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(cr, cc), **kw)
    with h5py.File(path, "r") as fh:
        masks = {
            fh["X"].id.get_chunk_info(i).filter_mask for i in range(fh["X"].id.get_num_chunks())
        }
    unchecked = pipeline in PIPELINES or pipeline == "bitshuffle" or pipeline.startswith("zfp")
    checked = not unchecked or "fletcher32" in pipeline  # ZFP's streams carry no check
    if "lzf" in pipeline and not checked:
        assert masks == {0, 0b10 if "shuffle" in pipeline else 0b1}  # some chunks stored raw
    want_type = np.dtype(STORED[dtype])
    for a, b, threads in ((0, n, 3), (77, 900, 1), (1_000, 1_003, 2)):
        out, want, slow = _read(path, want_type, a, b, threads)
        assert out.tobytes() == want.tobytes(), (a, b)
        edge = {(r0, c0) for r0, c0 in slow if r0 + cr > n or c0 + cc > d}
        assert set(slow) == edge  # only partial edge chunks go through h5py...
        if checked:
            assert not slow  # ...and none where the pipeline checks its input


def test_one_dimensional_lzf_targets_are_read_directly(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    X = np.round(rng.normal(size=(2_048, 3)), 1).astype(np.float32)
    y = rng.integers(0, 4, size=2_048).astype(np.int16)
    plain, packed = tmp_path / "plain.h5", tmp_path / "packed.h5"
    with h5py.File(plain, "w") as fh:
        fh["X"], fh["y"] = X, y
    with h5py.File(packed, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(256, 3), compression="lzf", shuffle=True)
        fh.create_dataset("y", data=y, chunks=(512,), compression="lzf", fletcher32=True)
    monkeypatch.setattr(
        chunk_read, "_read_with_h5py", lambda *a: pytest.fail("h5py read a provable chunk")
    )
    want = reader.read_block(str(plain), "X", "y", SerialComm(), Log())
    got = reader.read_block(str(packed), "X", "y", SerialComm(), Log())
    assert got.info.x_chunks is not None and got.info.y_chunks is not None
    assert got.X.tobytes() == want.X.tobytes() and got.y.tobytes() == want.y.tobytes()


def test_a_damaged_lzf_chunk_goes_to_h5py_which_names_the_data_set(tmp_path):
    X = np.round(np.random.default_rng(2).normal(size=(400, 4)), 1).astype(np.float32)
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(100, 4), compression="lzf")
    with h5py.File(path, "r") as fh:
        info = fh["X"].id.get_chunk_info_by_coord((200, 0))
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
    with open(path, "r+b") as f:  # a back reference before the start of the output
        f.seek(info.byte_offset)
        f.write(bytes([0xE0, 0xFF, 0xFF]))
    with pytest.raises(DataError, match="X' cannot be read"):
        chunk_read.read_rows(str(path), "X", lay, 0, 400, np.empty((400, 4), np.float32), 2)


def test_two_compressors_are_left_to_h5py(tmp_path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as fh:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((10, 2))
        dcpl.set_deflate(1)
        dcpl.set_filter(chunk_read.LZF, h5py.h5z.FLAG_OPTIONAL)
        space = h5py.h5s.create_simple((40, 2))
        h5py.h5d.create(fh.id, b"X", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        fh["X"][...] = np.arange(80, dtype=np.float32).reshape(40, 2)
    with h5py.File(path, "r") as fh:
        assert chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path)) is None
        assert fh["X"][39, 1] == 79


# ---- filters from hdf5plugin ---------------------------------------------------------------


def _zstd_file(path):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    X = np.round(np.random.default_rng(4).normal(size=(300, 3)), 2).astype(np.float32)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("g/X", data=X, chunks=(64, 3), **hdf5plugin.Zstd())
        fh.create_dataset("y", data=X[:, 0] > 0, chunks=(100,), **hdf5plugin.LZ4())
    return X


def test_zstd_and_lz4_files_read_with_hdf5plugin(tmp_path):
    X = _zstd_file(tmp_path / "z.h5")
    pytest.importorskip("zstandard")
    info = reader.inspect(str(tmp_path / "z.h5"), "g/X", "y")
    assert info.x_chunks is not None and info.y_chunks is None  # booleans: through h5py
    block = reader.read_block(str(tmp_path / "z.h5"), "g/X", "y", SerialComm(), Log())
    assert block.X.tobytes() == X.tobytes()
    assert np.array_equal(block.y, (X[:, 0] > 0).astype(np.float64))


def test_a_filter_hdf5_cannot_decode_is_one_line_naming_file_data_set_and_package(
    tmp_path, monkeypatch
):
    _zstd_file(tmp_path / "z.h5")
    avail = h5py.h5z.filter_avail
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda f: f != 32015 and avail(f))
    with pytest.raises(DataError) as err:
        reader.inspect(str(tmp_path / "z.h5"), "g/X", None)
    msg = str(err.value)
    assert "z.h5:g/X'" in msg and "zstd (HDF5 filter 32015)" in msg
    assert "pip install hdf5plugin" in msg and "\n" not in msg


def test_without_hdf5plugin_a_zstd_file_is_one_error_line(tmp_path):
    _zstd_file(tmp_path / "z.h5")
    code = (  # a process where hdf5plugin cannot be imported: HDF5 has no zstd filter
        "import sys; sys.modules['hdf5plugin'] = None\n"
        "from lepton_hpc.data import reader\n"
        "from lepton_hpc.errors import DataError\n"
        "try:\n"
        f"    reader.inspect({str(tmp_path / 'z.h5')!r}, 'g/X', None)\n"
        "except DataError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    msg = run.stdout.strip()
    assert "z.h5:g/X' is compressed with zstd (HDF5 filter 32015)" in msg
    assert "pip install hdf5plugin" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("name", "codecs"),
    [
        ("lz4", "system"),
        ("lz4", "package"),
        ("blosc lz4+shuffle", "package"),
        ("zstd", "system"),
        ("zstd", "package"),
        ("gzip+shuffle", "system"),
        ("gzip+shuffle", "package"),
    ],
)
def test_damaged_compressed_chunks_are_refused(tmp_path, monkeypatch, name, codecs):
    """A chunk cut short, or with a size in its header that is not the chunk's, decodes to None
    (h5py then reads it, and names the data set if HDF5 fails too), never to other bytes:
    through the system's liblz4 and libzstd and through the ``lz4`` and ``zstandard``
    packages alike."""
    pipelines = {**_plugin_pipelines(), "gzip+shuffle": {"compression": "gzip", "shuffle": True}}
    if name not in pipelines:
        pytest.skip(f"{name}: its package is not installed")
    _use_codecs(monkeypatch, codecs)
    X = np.round(np.random.default_rng(9).normal(size=(500, 4)), 1).astype(np.float32)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(500, 4), **pipelines[name])
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
        _, raw = fh["X"].id.read_direct_chunk((0, 0))
    nbytes = X.nbytes
    good = chunk_read.decode(raw, lay.filters, nbytes, 4)
    assert good is not None and good.tobytes() == X.tobytes()
    for cut in (0, 3, 12, 16, len(raw) // 2, len(raw) - 1):
        assert chunk_read.decode(raw[:cut], lay.filters, nbytes, 4) is None, cut
    padded = chunk_read.decode(raw + b"\0", lay.filters, nbytes, 4)  # bytes left over
    if name == "gzip+shuffle":  # HDF5's deflate filter reads the stream and ignores the rest
        assert padded is not None and padded.tobytes() == X.tobytes()
    else:
        assert padded is None
    assert chunk_read.decode(raw, lay.filters, nbytes - 4, 4) is None  # not this chunk's size
    if name == "lz4":
        bad = (nbytes + 1).to_bytes(8, "big") + raw[8:]
    elif name == "gzip+shuffle":  # a byte changed inside the stream: its Adler-32 fails
        bad = raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x5A]) + raw[len(raw) // 2 + 1 :]
    elif name == "zstd":  # a byte changed inside the compressed data
        bad = raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x5A]) + raw[len(raw) // 2 + 1 :]
        got = chunk_read.decode(bad, lay.filters, nbytes, 4)
        assert got is None or got.tobytes() == X.tobytes()
        bad = raw[:5] + bytes([raw[5] ^ 1]) + raw[6:]  # the content size in the frame header
    else:
        bad = raw[:4] + (nbytes + 1).to_bytes(4, "little") + raw[8:]
    assert chunk_read.decode(bad, lay.filters, nbytes, 4) is None


def _private_pipelines() -> dict:
    """hdf5plugin's SZ, SZ3, SPERR, FCIDecomp and HTJ2K (``plugin_filters``), each with a stored
    type it encodes: lossy, so the reader must give h5py's decoded values bit for bit."""
    try:
        import hdf5plugin
    except ImportError:
        return {}
    found = {
        ("sz", "f4"): dict(hdf5plugin.SZ(absolute=1e-2)),
        ("sz", "f8"): dict(hdf5plugin.SZ(pointwise_relative=1e-3)),
        ("sz3", "f4"): dict(hdf5plugin.SZ3(absolute=1e-2)),
        ("sz3", "f8"): dict(hdf5plugin.SZ3(relative=1e-4)),
        ("sz3", "i2"): dict(hdf5plugin.SZ3(absolute=1)),
        ("sperr", "f4"): dict(hdf5plugin.Sperr(rate=8)),
        ("sperr", "f8"): dict(hdf5plugin.Sperr(absolute=1e-3)),
        ("fcidecomp", "u2"): dict(hdf5plugin.FciDecomp()),
        ("fcidecomp", "i2"): dict(hdf5plugin.FciDecomp()),
        ("htj2k", "u1"): dict(hdf5plugin.Htj2k()),
        ("htj2k", "i2"): dict(hdf5plugin.Htj2k()),
    }
    names = {v.lower(): k for k, v in plugin_filters.NAMES.items()}
    return {k: v for k, v in found.items() if names[k[0]] in chunk_read.FILTERS}


@pytest.mark.parametrize("case", list(_private_pipelines()), ids="-".join)
def test_private_plugin_chunks_equal_h5py_bitwise(tmp_path, case):
    """SZ, SZ3, SPERR, FCIDecomp and HTJ2K chunks decoded on the rank's threads by the
    plugins' own filter functions (a private instance, without HDF5; for SZ one per busy
    thread) give h5py's values bit for bit; only partial edge chunks go through h5py."""
    dtype = case[1]
    rng = np.random.default_rng(zlib.crc32("-".join(case).encode()))
    smooth = np.cumsum(rng.normal(size=(1_003, 40)), axis=0)
    X = (smooth if dtype[0] == "f" else np.abs(smooth) * 3).astype(dtype)
    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(128, 20), **_private_pipelines()[case])
    want_type = np.dtype(np.float64 if dtype == "f8" else np.float32)
    for a, b, threads in ((0, 1_003, 3), (77, 900, 2), (1_000, 1_003, 1)):
        out, want, slow = _read(path, want_type, a, b, threads)
        assert out.tobytes() == want.tobytes(), (a, b)
        assert all(r0 + 128 > 1_003 for r0, _ in slow)  # only the partial edge chunks


def test_a_private_plugin_refuses_what_it_cannot_decode_without_hdf5(tmp_path):
    """A chunk the filter fails on (filter values it rejects: its error goes to hdf5plugin's
    no-op stand-in of H5Epush, not to HDF5) or decodes to another size gives False, and the
    same chunk still decodes right afterwards."""
    cases = {k: v for k, v in _private_pipelines().items() if k == ("sperr", "f4")}
    if not cases:
        pytest.skip("hdf5plugin's SPERR is not available")
    X = np.cumsum(np.random.default_rng(3).normal(size=(64, 32)), axis=0).astype(np.float32)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(64, 32), **cases[("sperr", "f4")])
    with h5py.File(path, "r") as fh:
        _, _, values, _ = fh["X"].id.get_create_plist().get_filter(0)
        _, raw = fh["X"].id.read_direct_chunk((0, 0))
        ref = fh["X"][:]
    src = np.frombuffer(raw, np.uint8)
    out = np.zeros(X.nbytes, np.uint8)
    assert not plugin_filters.decode_into(32028, src, tuple(values)[:3], out)  # rejected
    assert not plugin_filters.decode_into(32028, src, tuple(values), out[:-4])  # another size
    assert not plugin_filters.decode_into(32028, src[:0], tuple(values), out)  # empty
    assert not plugin_filters.decode_into(12345, src, tuple(values), out)  # not one of ours
    assert plugin_filters.decode_into(32028, src, tuple(values), out)
    assert out.view(np.float32).reshape(X.shape).tobytes() == ref.tobytes()


def test_a_plugin_whose_private_instance_does_not_load_is_left_to_hdf5(tmp_path, monkeypatch):
    """Where the private instance cannot be loaded (no link namespace left, say), the data set
    is read by h5py, and ``lepton inspect`` says so."""
    from lepton_hpc.inspect_cmd import inspect_file

    case = ("sz3", "f4")
    if case not in _private_pipelines():
        pytest.skip("hdf5plugin's SZ3 is not available")
    monkeypatch.setattr(plugin_filters, "_load", lambda fid: None)
    pools = {fid: plugin_filters._Pool(fid) for fid in plugin_filters.LIBRARIES}
    monkeypatch.setattr(plugin_filters, "_POOLS", pools)
    X = np.cumsum(np.random.default_rng(4).normal(size=(300, 8)), axis=0).astype(np.float32)
    path = tmp_path / "z.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(100, 8), **_private_pipelines()[case])
        fh["y"] = X[:, 0] > 0
    with h5py.File(path, "r") as fh:
        assert chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path)) is None
    sets = {d["path"]: d for d in inspect_file(path, "X", "y")["datasets"]}
    assert sets["/X"]["load"] == "through HDF5"


def test_szip_chunks_cut_short_or_of_another_size_are_refused(tmp_path):
    """A szip chunk whose stored size (its first 4 bytes) or decoded size is not the chunk's,
    or that libsz cannot decode, gives None (h5py then reads it); szip checks nothing else, so
    a damaged chunk of the right size decodes as HDF5 decodes it."""
    if "szip nn 8" not in PIPELINES:
        pytest.skip("HDF5's szip filter or libsz is not available")
    X = (np.arange(512)[:, None] + np.arange(4)).astype(np.float32)  # smooth: szip shrinks it
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(512, 4), **PIPELINES["szip nn 8"])
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
        mask, raw = fh["X"].id.read_direct_chunk((0, 0))
    assert mask == 0 and lay.filters[0][0] == chunk_read.SZIP
    nbytes = X.nbytes
    good = chunk_read.decode(raw, lay.filters, nbytes, 4)
    assert good is not None and good.tobytes() == X.tobytes()
    for cut in (0, 3, 4, 5, len(raw) // 2):
        assert chunk_read.decode(raw[:cut], lay.filters, nbytes, 4) is None, cut
    assert chunk_read.decode(raw, lay.filters, nbytes - 4, 4) is None  # not this chunk's size
    bad = (nbytes + 4).to_bytes(4, "little") + raw[4:]
    assert chunk_read.decode(bad, lay.filters, nbytes, 4) is None
    values = lay.filters[0][1]
    odd = ((chunk_read.SZIP, (values[0], values[1], 12, values[3])),)  # bits a pixel HDF5 sets
    got = chunk_read.decode(raw, odd, nbytes, 4)  # never set: refused, or other bytes as HDF5
    assert got is None or got.size == nbytes
    assert chunk_read.decode(raw, ((chunk_read.SZIP, values[:3]),), nbytes, 4) is None


def test_damaged_bzip2_chunks_are_refused(tmp_path):
    """bzip2: a chunk cut short, padded, of another size, or with any one byte changed (its
    CRCs) decodes to None, never to other bytes."""
    if "bzip2" not in _plugin_pipelines():
        pytest.skip("hdf5plugin is not installed")
    X = np.round(np.random.default_rng(10).normal(size=(500, 4)), 1).astype(np.float32)
    path = tmp_path / "z.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(500, 4), **_plugin_pipelines()["bzip2"])
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
        _, raw = fh["X"].id.read_direct_chunk((0, 0))
    nbytes = X.nbytes
    assert chunk_read.decode(raw, lay.filters, nbytes, 4).tobytes() == X.tobytes()
    for cut in (0, 4, 10, len(raw) // 2, len(raw) - 1):
        assert chunk_read.decode(raw[:cut], lay.filters, nbytes, 4) is None, cut
    assert chunk_read.decode(raw + b"\0", lay.filters, nbytes, 4) is None
    assert chunk_read.decode(raw, lay.filters, nbytes - 4, 4) is None
    assert chunk_read.decode(raw, lay.filters, nbytes + 4, 4) is None
    for at in range(4, len(raw), max(1, len(raw) // 60)):
        bad = raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :]
        got = chunk_read.decode(bad, lay.filters, nbytes, 4)
        assert got is None or got.tobytes() == X.tobytes(), at


@pytest.mark.parametrize(
    ("name", "codecs"),
    [
        ("bitshuffle+lz4", "system"),
        ("bitshuffle+lz4", "package"),
        ("bitshuffle+zstd (blocks of 256)", "system"),
    ],
)
def test_damaged_bitshuffle_chunks_are_refused(tmp_path, monkeypatch, name, codecs):
    """Bitshuffle with LZ4 or zstd: a chunk cut short, padded, or whose header size or block
    size is not this chunk's decodes to None, never to other bytes (its LZ4 blocks decoded by
    liblz4 or by the Numba decoder, its zstd blocks by libzstd)."""
    pipelines = _plugin_pipelines()
    if name not in pipelines:
        pytest.skip(f"hdf5plugin is not installed, or {name} is not decoded here")
    _use_codecs(monkeypatch, codecs)
    X = np.round(np.random.default_rng(8).normal(size=(501, 4)), 1).astype(np.float32)
    path = tmp_path / "b.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(501, 4), **pipelines[name])
    with h5py.File(path, "r") as fh:
        lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
        _, raw = fh["X"].id.read_direct_chunk((0, 0))
    nbytes = X.nbytes
    assert chunk_read.decode(raw, lay.filters, nbytes, 4).tobytes() == X.tobytes()
    for cut in (0, 8, 12, 16, len(raw) // 2, len(raw) - 1):
        assert chunk_read.decode(raw[:cut], lay.filters, nbytes, 4) is None, cut
    assert chunk_read.decode(raw + b"\0", lay.filters, nbytes, 4) is None
    assert chunk_read.decode(raw, lay.filters, nbytes - 4, 4) is None
    for block in (0, 12, 4 * 7):  # none, not whole elements, not a multiple of 8 elements
        bad = raw[:8] + block.to_bytes(4, "big") + raw[12:]
        assert chunk_read.decode(bad, lay.filters, nbytes, 4) is None, block


def test_zfp_chunks_cut_short_or_of_another_size_are_refused(tmp_path):
    """A ZFP chunk cut short makes zfp read past its stream, and a chunk of another size is
    not this data set's: both decode to None (h5py then reads the chunk, or gives the error).
    zfp checks nothing else in a stream, through HDF5 as here."""
    pipelines = _plugin_pipelines()
    if "zfp rate 12" not in pipelines:
        pytest.skip("hdf5plugin's ZFP is not available")
    X = np.round(np.random.default_rng(3).normal(size=(512, 4)), 2).astype(np.float32)
    for name in ("zfp rate 12", "zfp accuracy 1e-3"):
        path = tmp_path / "z.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("X", data=X, chunks=(512, 4), **pipelines[name])
        with h5py.File(path, "r") as fh:
            lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
            want = fh["X"][:]
            _, raw = fh["X"].id.read_direct_chunk((0, 0))
        padded = np.zeros(len(raw) + 4096, np.uint8)  # zfp may read on past a cut stream
        padded[: len(raw)] = np.frombuffer(raw, np.uint8)
        got = chunk_read.decode(padded[: len(raw)], lay.filters, X.nbytes, 4)
        assert got.tobytes() == want.tobytes()
        for cut in (8, len(raw) // 2, len(raw) - 8):
            assert chunk_read.decode(padded[:cut], lay.filters, X.nbytes, 4) is None, cut
        assert chunk_read.decode(padded[: len(raw)], lay.filters, X.nbytes - 4, 4) is None


def test_zfp_values_of_a_newer_codec_are_left_to_hdf5():
    """Filter values naming a zfp codec newer than the library's (or no header) are not
    parsed: such data sets go through HDF5, which decodes them or gives its error."""
    from lepton_hpc.data import zfp

    if not zfp.available():
        pytest.skip("hdf5plugin's ZFP is not available")
    assert not zfp._codec_too_new((0x1000_5112,), 5)  # H5Z-ZFP 1.1.2, zfp 1.0, codec 5
    assert zfp._codec_too_new((0x1000_6112,), 5)  # codec 6
    assert not zfp._codec_too_new((0x0054_0100,), 5)  # H5Z-ZFP 0.1.0, zfp 0.5.4: codec 5
    assert zfp.parse((0x1000_F112, 1, 2, 3)) is None
    assert zfp.parse((0x1000_5112,)) is None


def test_bit_unshuffle_undoes_the_bit_transpose():
    """Bit k of byte j of element i is bit i % 8 of byte (8 j + k) n / 8 + i // 8, for element
    sizes 1 to 8 and a few block lengths (the definition the decoder implements)."""
    rng = np.random.default_rng(2)
    for size in (1, 2, 3, 4, 8):
        for n in (8, 16, 136):
            data = rng.integers(0, 256, size=n * size, dtype=np.uint8)
            bits = np.unpackbits(data.reshape(n, size), axis=1, bitorder="little")  # (n, 8 size)
            shuffled = np.packbits(bits.T.reshape(8 * size, n // 8, 8), axis=2, bitorder="little")
            out = np.empty_like(data)
            chunk_read._bit_unshuffle(shuffled.reshape(-1), n, size, out)
            assert np.array_equal(out, data), (size, n)


def _lz4_payloads():
    """Byte strings LZ4 compresses in every way: literals only, short and long matches, matches
    overlapping what they copy (runs), lengths past 15 and 270 (extra length bytes)."""
    pattern = st.binary(min_size=1, max_size=40)
    return st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=300),  # (a block always holds bytes)
            st.builds(lambda p, k: p * k, pattern, st.integers(1, 400)),
        ),
        min_size=1,
        max_size=8,
    ).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=_lz4_payloads(), damage=st.lists(st.tuples(st.integers(0), st.integers(0, 255))))
def test_the_numba_lz4_block_decoder_agrees_with_lz4(data, damage):
    """``_lz4_block_into`` (bitshuffle's blocks) decodes what ``lz4.block`` writes. A block with
    bytes changed is refused whenever the lz4 library refuses it, and where it is decoded both
    give the same bytes; it may refuse more (a match at offset 0, which the format calls
    corrupt and the library copies anyway: h5py then reads that chunk). It never reads or
    writes outside its ranges."""
    lz4_block = pytest.importorskip("lz4.block")
    want = len(data)
    block = bytearray(lz4_block.compress(data, store_size=False))
    for at, value in damage:
        block[at % len(block)] = value
    src = np.frombuffer(bytes(block), dtype=np.uint8)
    pad = 16  # guard bytes around both ranges: never touched
    dst = np.full(want + 2 * pad, 7, dtype=np.uint8)
    ok = chunk_read._lz4_block_into(
        np.concatenate([np.full(pad, 9, np.uint8), src, np.full(pad, 9, np.uint8)]),
        pad,
        pad + src.size,
        dst,
        pad,
        pad + want,
    )
    assert (dst[:pad] == 7).all() and (dst[pad + want :] == 7).all()
    try:
        ref = lz4_block.decompress(bytes(block), uncompressed_size=want)
    except lz4_block.LZ4BlockError:
        ref = None
    if ok:
        assert ref is not None and dst[pad : pad + want].tobytes() == ref
    if not damage:
        assert ok and dst[pad : pad + want].tobytes() == data
    if native_codecs.LZ4_IN_NUMBA:  # the same block through liblz4, called from Numba code
        dst_c = np.full(want + 2 * pad, 7, dtype=np.uint8)
        padded = np.concatenate([np.full(pad, 9, np.uint8), src, np.full(pad, 9, np.uint8)])
        ok_c = chunk_read._lz4_block_c(padded, pad, pad + src.size, dst_c, pad, pad + want)
        assert (dst_c[:pad] == 7).all() and (dst_c[pad + want :] == 7).all()
        assert ok_c == (ref is not None and len(ref) == want)
        if ok_c:
            assert dst_c[pad : pad + want].tobytes() == ref


def _use_codecs(monkeypatch, codecs: str) -> None:
    """Decode deflate, LZ4 and zstd through the system's libraries or through zlib and the
    packages."""
    native = codecs == "system"
    if native and not (
        native_codecs.lz4_available()
        and native_codecs.zstd_available()
        and native_codecs.deflate_available()
    ):
        pytest.skip("liblz4, libzstd or libdeflate cannot be loaded")
    if not native and (chunk_read._LZ4 is None or chunk_read._ZSTD is None):
        pytest.skip("the lz4 or zstandard package is not installed")
    if native and not native_codecs.LZ4_IN_NUMBA:
        pytest.skip("liblz4 cannot be loaded")
    for flag in ("_NATIVE_LZ4", "_NATIVE_ZSTD", "_NATIVE_DEFLATE", "_NATIVE_LZ4_BLOCKS"):
        monkeypatch.setattr(chunk_read, flag, native)


def _decoded_within_bounds(decoder, buf: bytes, size: int) -> bytes | None:
    """``decoder(buf, out)`` into ``size`` bytes followed by guard bytes, which it must never
    write: the bytes when it succeeds, else None."""
    guard = np.full(size + 16, 7, dtype=np.uint8)
    ok = decoder(np.frombuffer(buf, np.uint8), guard[:size])
    assert (guard[size:] == 7).all()
    return guard[:size].tobytes() if ok else None


@FAST
@given(data=chunk_bytes(), damage=st.lists(st.tuples(st.integers(0), st.integers(0, 255))))
def test_the_system_libdeflate_agrees_with_zlib(data, damage):
    """``native_codecs.zlib_stream_into`` inflates what ``zlib`` deflates (HDF5's deflate
    filter) to exactly the chunk's size; with bytes changed it succeeds exactly when
    ``zlib.decompress`` gives the chunk's size, with the same bytes (both check the stream's
    Adler-32); nothing past the output is written."""
    if not native_codecs.deflate_available():
        pytest.skip("libdeflate cannot be loaded")
    stream = bytearray(zlib.compress(data, 1))
    n = len(data)

    native = functools.partial(_decoded_within_bounds, native_codecs.zlib_stream_into)
    assert native(bytes(stream), n) == data
    assert native(bytes(stream) + b"\0junk", n) == data  # after the stream: ignored, as HDF5
    assert native(bytes(stream[:-1]), n) is None  # cut short (the checksum)
    assert native(bytes(stream), n + 1) is None and (n == 0 or native(bytes(stream), n - 1) is None)
    for at, value in damage:
        stream[at % len(stream)] = value
    try:
        ref = zlib.decompress(bytes(stream))
    except zlib.error:
        ref = None
    assert native(bytes(stream), n) == (ref if ref is not None and len(ref) == n else None)


@settings(max_examples=300, deadline=None)
@given(data=_lz4_payloads(), damage=st.lists(st.tuples(st.integers(0), st.integers(0, 255))))
def test_the_system_liblz4_agrees_with_the_lz4_package(data, damage):
    """``native_codecs.lz4_block_into`` decodes what ``lz4.block`` writes; a block with bytes
    changed is refused exactly when the package refuses it (or does not decode to the chunk's
    size), else both give the same bytes; nothing past the output is written."""
    lz4_block = pytest.importorskip("lz4.block")
    if not native_codecs.lz4_available():
        pytest.skip("liblz4 cannot be loaded")
    want = len(data)
    block = bytearray(lz4_block.compress(data, store_size=False))
    for at, value in damage:
        block[at % len(block)] = value
    guard = np.full(want + 16, 7, dtype=np.uint8)
    ok = native_codecs.lz4_block_into(np.frombuffer(bytes(block), np.uint8), guard[:want])
    assert (guard[want:] == 7).all()
    try:
        ref = lz4_block.decompress(bytes(block), uncompressed_size=want)
    except lz4_block.LZ4BlockError:
        ref = None
    assert ok == (ref is not None and len(ref) == want)
    if ok:
        assert guard[:want].tobytes() == ref
    if not damage:
        assert ok and guard[:want].tobytes() == data


@FAST
@given(data=chunk_bytes(), damage=st.lists(st.tuples(st.integers(0), st.integers(0, 255))))
def test_the_system_libzstd_agrees_with_zstandard(data, damage):
    """``native_codecs.zstd_frame_into`` decodes one frame to exactly its header's content
    size: what ``zstandard`` writes, and nothing cut short, padded or of another size. With
    bytes changed it decodes or refuses (a frame without a checksum, as hdf5plugin writes
    them, cannot show every change; library versions differ on which), and the output's
    neighbours are never written."""
    zstandard = pytest.importorskip("zstandard")
    if not native_codecs.zstd_available():
        pytest.skip("libzstd cannot be loaded")
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(data))
    n = len(data)

    native = functools.partial(_decoded_within_bounds, native_codecs.zstd_frame_into)
    assert native(bytes(frame), n) == data
    assert native(bytes(frame) + b"\0", n) is None  # bytes after the frame
    assert native(bytes(frame[:-1]), n) is None  # cut short
    assert native(bytes(frame), n + 1) is None and (n == 0 or native(bytes(frame), n - 1) is None)
    for at, value in damage:  # decoded or refused, within its bounds (the guard above)
        frame[at % len(frame)] = value
    native(bytes(frame), n)


def test_a_threads_buffers_are_reused_from_chunk_to_chunk(tmp_path):
    """With a thread's Scratch, the stored chunk and each stage's output go to its buffers
    (kept from chunk to chunk, never a stage's own input): two chunks decoded in turn give
    their own bytes from the same memory."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    rng = np.random.default_rng(12)
    X = (rng.integers(-20, 20, size=(256, 6)) / 4).astype(np.float32)
    pipelines = {
        "lzf": {"compression": "lzf", "shuffle": True, "fletcher32": True},
        "lz4": {**hdf5plugin.LZ4(), "shuffle": True},
        "zstd": {**hdf5plugin.Zstd(), "shuffle": True},
        "bitshuffle": dict(hdf5plugin.Bitshuffle(cname="lz4")),
    }
    for name, kw in pipelines.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("X", data=X, chunks=(128, 6), **kw)
        with h5py.File(path, "r") as fh:
            lay = chunk_read.layout(fh["X"], np.dtype(np.float32), os.stat(path))
            raws = [fh["X"].id.read_direct_chunk((r0, 0))[1] for r0 in (0, 128)]
        assert lay is not None, name
        scratch = chunk_read.Scratch()
        got = []
        for r0, raw in zip((0, 128), raws, strict=True):
            stored = scratch.take("raw", len(raw))
            stored[:] = np.frombuffer(raw, np.uint8)
            out = chunk_read.decode(stored, lay.filters, 128 * 6 * 4, 4, scratch=scratch)
            assert out is not None and out.tobytes() == X[r0 : r0 + 128].tobytes(), name
            got.append(out)
        assert np.may_share_memory(got[0], got[1]), name  # the same buffer, reused


IN_PLACE = {  # hdf5plugin filters whose chunks of whole rows are decoded into the rows read
    "bitshuffle+lz4": lambda p: dict(p.Bitshuffle(cname="lz4")),
    "bitshuffle": lambda p: dict(p.Bitshuffle(cname="none")),
    "blosc lz4+shuffle": lambda p: dict(p.Blosc(cname="lz4", clevel=5, shuffle=p.Blosc.SHUFFLE)),
    "gzip+shuffle": lambda p: {"compression": "gzip", "shuffle": True},  # (the shuffle's output)
    "lz4+shuffle": lambda p: {**p.LZ4(), "shuffle": True},
    "blosc2 lz4+shuffle": lambda p: dict(p.Blosc2(cname="lz4", filters=p.Blosc2.SHUFFLE)),
}


@pytest.mark.parametrize("pipeline", list(IN_PLACE))
def test_chunks_of_whole_rows_decode_in_place(tmp_path, monkeypatch, pipeline):
    """Chunks holding whole rows in the read type are decoded straight into the rows read (no
    copy); a chunk whose decoding fails after writing there is then read by h5py over it."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    for name, fid in (
        ("blosc ", chunk_read.BLOSC),
        ("blosc2", chunk_read.BLOSC2),
        ("lz4+", chunk_read.LZ4),
    ):
        if pipeline.startswith(name) and fid not in chunk_read.FILTERS:
            pytest.skip(f"{name} is not installed")
    rng = np.random.default_rng(11)
    n, d, cr = 1_003, 6, 128
    X = (rng.integers(-20, 20, size=(n, d)) / 4).astype(np.float32)  # compressible: few values
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(cr, d), **IN_PLACE[pipeline](hdf5plugin))
    real, seen, placed, lock = chunk_read.decode, [], [], threading.Lock()

    def failing_once(raw, filters, nbytes, itemsize, mask=0, into=None, threads=1, scratch=None):
        with lock:  # the rank's threads decode at once: the second call fails, whichever it is
            second = len(seen) == 1
            seen.append(into is not None)
        got = real(raw, filters, nbytes, itemsize, mask, into, threads, scratch)
        placed.append(got is not None and got is into)
        if second:
            if got is into:
                into[:] = 0xFF  # the rows it was given are garbage, and it says so
            return None
        return got

    monkeypatch.setattr(chunk_read, "decode", failing_once)
    for a, b, threads in ((0, n, 1), (77, 900, 2), (128, 384, 1)):
        seen.clear()
        out, want, slow = _read(path, np.dtype(np.float32), a, b, threads)
        assert out.tobytes() == want.tobytes(), (a, b)
        whole = sum(a <= r0 and r0 + cr <= min(b, n) for r0 in range(0, n, cr))
        assert sum(seen) == whole  # every chunk of whole rows in the range is offered its rows
        # the failed chunk, and the partial edge chunk where nothing checks it (bitshuffle alone)
        assert len(slow) == 1 + (pipeline == "bitshuffle" and (n // cr) * cr < b)
    assert sum(placed) >= 15  # and decoded there


@pytest.mark.parametrize("blocks", [(16, 6), (16, 2), (7, 6)])
def test_blosc2_arrays_decode_in_c_order(blocks):
    """A Blosc2 frame's b2nd array stores its blocks one after another: blocks of whole rows
    that fill the chunk decode straight into the rows; blocks splitting columns, or padded at
    the end, are put in C order by b2nd. Either way the bytes are the array's."""
    blosc2 = pytest.importorskip("blosc2")
    X = np.arange(64 * 6, dtype=np.float32).reshape(64, 6) / 7
    frame = blosc2.asarray(X, chunks=(64, 6), blocks=blocks).to_cframe()
    for threads in (1, 2):  # from the frame, or its chunk taken out and decoded without the GIL
        into = np.zeros(X.nbytes, dtype=np.uint8)
        got = chunk_read._blosc2_decode(frame, X.nbytes, into, threads=threads)
        assert got is not None and got.tobytes() == X.tobytes()
        assert (got is into) == (blocks == (16, 6))
    assert chunk_read._blosc2_decode(frame, X.nbytes - 4) is None  # not this chunk's size
    assert chunk_read._blosc2_decode(frame[: len(frame) // 2], X.nbytes) is None  # cut short
    assert chunk_read._blosc2_decode(X.tobytes(), X.nbytes) is None  # stored unfiltered


@pytest.mark.parametrize(
    ("n", "chunk", "threads"), [(128, 1 << 20, 2), (5, 1 << 20, 2), (1, 64, 3)]
)
def test_a_threads_chunks_come_in_runs_of_consecutive_chunks(n, chunk, threads):
    """The chunk tasks go to the threads as runs of consecutive chunks (each thread writes its
    own stretch of the rows), of at most ``RUN_BYTES`` each, and at least two runs a thread
    where there are enough chunks; every task once, in order."""
    tasks = list(range(n))
    runs = chunk_read.task_runs(tasks, chunk, threads)
    assert [t for run in runs for t in run] == tasks
    assert all(len(run) * chunk <= max(chunk, chunk_read.RUN_BYTES) for run in runs)
    assert len(runs) >= min(n, 2 * threads)

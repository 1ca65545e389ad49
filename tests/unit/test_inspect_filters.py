"""``lepton inspect`` on lzf and hdf5plugin filters: the load class is the chunk reader's verdict,
and a filter HDF5 cannot decode is a note naming it and the package to install."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from lepton_hpc.inspect_cmd import inspect_file


def _file(path):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    pytest.importorskip("zstandard")
    X = np.round(np.random.default_rng(1).normal(size=(500, 3)), 2).astype(np.float32)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, chunks=(100, 3), compression="lzf", shuffle=True)
        fh.create_dataset("zstd", data=X, chunks=(100, 3), **hdf5plugin.Zstd())
        fh.create_dataset("lz4", data=X, chunks=(100, 3), **hdf5plugin.LZ4())
        fh.create_dataset("y", data=X[:, 0], chunks=(100,), **hdf5plugin.Blosc())
        fh.create_dataset("blosc2", data=X, chunks=(100, 3), **hdf5plugin.Blosc2())
        fh.create_dataset("zfp", data=X, chunks=(100, 3), **hdf5plugin.Zfp(reversible=True))
        fh.create_dataset("sz", data=X, chunks=(100, 3), **hdf5plugin.SZ(absolute=1e-3))
        fh.create_dataset("sz3", data=X, chunks=(100, 3), **hdf5plugin.SZ3(absolute=1e-3))
        fh.create_dataset("szip", data=X[:, :1] * 0, chunks=(100, 1), compression="szip")
    return path


def test_filters_the_reader_decodes_are_compressed_other_plugins_through_hdf5(tmp_path):
    from lepton_hpc.data import chunk_read

    report = inspect_file(_file(tmp_path / "f.h5"), "X", "y")
    sets = {d["path"]: d for d in report["datasets"]}

    def ours(fid: int) -> str:
        return "compressed" if fid in chunk_read.FILTERS else "through HDF5"

    assert {p: d["load"] for p, d in sets.items()} == {
        "/X": "compressed",
        "/zstd": "compressed",
        "/lz4": ours(chunk_read.LZ4),  # with the lz4 package
        "/y": ours(chunk_read.BLOSC),  # with the blosc package
        "/blosc2": ours(chunk_read.BLOSC2),  # with the blosc2 package
        "/zfp": ours(chunk_read.ZFP),  # with hdf5plugin's zfp library
        "/sz": ours(32017),  # one private instance per busy thread
        "/sz3": ours(32024),  # the plugin's own filter function, without HDF5
        "/szip": ours(chunk_read.SZIP),  # HDF5's szip, by the system's libsz
    }
    assert "lz4" in sets["/lz4"]["why"] and "zstd" in sets["/zstd"]["why"]
    assert "blosc2" in sets["/blosc2"]["why"] and "zfp" in sets["/zfp"]["why"]
    assert "sz" in sets["/sz"]["why"] and "szip" in sets["/szip"]["why"]
    assert "sz3" in sets["/sz3"]["why"].lower()
    assert not any("cannot decode" in n for d in sets.values() for n in d["notes"])


def test_a_filter_hdf5_cannot_decode_is_a_note_and_the_readers_error(tmp_path, monkeypatch):
    path = _file(tmp_path / "f.h5")
    avail = h5py.h5z.filter_avail
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda f: f != 32004 and avail(f))
    report = inspect_file(path, "lz4", None)
    sets = {d["path"]: d for d in report["datasets"]}
    assert sets["/lz4"]["load"] == "through HDF5" and "cannot decode" in sets["/lz4"]["why"]
    assert any("lz4 (HDF5 filter 32004)" in n for n in sets["/lz4"]["notes"])
    assert any("pip install hdf5plugin" in n for n in sets["/lz4"]["notes"])
    assert not any("cannot decode" in n for n in sets["/zstd"]["notes"])
    assert "pip install hdf5plugin" in str(report["defaults"])

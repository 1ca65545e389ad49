"""model.h5: round trip, a checksum that catches an altered byte or attribute, format 1 still read."""

import json

import h5py
import numpy as np
import pytest

from lepton_hpc.data.preprocess import Scaler
from lepton_hpc.errors import DataError
from lepton_hpc.models import Model
from lepton_hpc.models.io import FORMAT_VERSION, load_model, save_model

META = {
    "config": {"data": {"x": "X", "y": "y"}},
    "data": {"sample_sha256": "ab" * 32, "shape_x": [100, 3], "dtype_x": "float32"},
    "optimizer": {"name": "adam", "beta1": 0.9},
}


def saved(tmp_path, meta=META):
    model = Model("mlp", (3, 4, 1), "tanh", "binary")
    params = np.linspace(-1.0, 1.0, model.n_params)
    scaler = Scaler("zscore", np.array([0.5, 1.0, 2.0]), np.array([1.0, 2.0, 4.0]))
    path = tmp_path / "model.h5"
    save_model(path, model, params, scaler, meta)
    return path, model, params, scaler


def test_round_trip_with_meta(tmp_path):
    path, model, params, scaler = saved(tmp_path)
    m, p, s, meta = load_model(path)
    assert m == model and np.array_equal(p, params) and p.dtype == np.float64
    assert s.kind == "zscore" and np.array_equal(s.shift, scaler.shift)
    assert np.array_equal(s.scale, scaler.scale)
    assert meta == META  # data fingerprint and optimiser identity come back as given
    with h5py.File(path, "r") as fh:
        assert int(fh.attrs["format_version"]) == FORMAT_VERSION == 2
        assert len(fh.attrs["sha256"]) == 64
    assert not list(tmp_path.glob(".*tmp"))


def test_an_altered_byte_of_the_parameters_fails_the_checksum(tmp_path):
    path = saved(tmp_path)[0]
    with h5py.File(path, "r") as fh:
        offset = fh["params"].id.get_offset()  # where the raw values lie in the file
    assert offset is not None
    raw = bytearray(path.read_bytes())
    raw[offset + 3] ^= 0x01  # one bit of the first parameter's mantissa
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        load_model(path)
    assert str(err.value) == f"model file '{path}' fails its checksum (damaged or altered)"


@pytest.mark.parametrize(
    ("name", "alter"),
    [
        ("params", lambda fh: fh["params"].__setitem__(0, 5.0)),
        ("scaler", lambda fh: fh["scaler/scale"].__setitem__(1, 3.0)),
        ("activation", lambda fh: fh.attrs.__setitem__("activation", "relu")),
        ("meta", lambda fh: fh.attrs.__setitem__("meta", json.dumps({"config": {}}))),
        ("extra", lambda fh: fh.create_dataset("extra", data=np.zeros(2))),
    ],
)
def test_any_alteration_fails_the_checksum(tmp_path, name, alter):
    path = saved(tmp_path)[0]
    with h5py.File(path, "r+") as fh:
        alter(fh)
    with pytest.raises(DataError, match="fails its checksum"):
        load_model(path)


def test_a_missing_checksum_in_format_2_fails(tmp_path):
    path = saved(tmp_path)[0]
    with h5py.File(path, "r+") as fh:
        del fh.attrs["sha256"]
    with pytest.raises(DataError, match="fails its checksum"):
        load_model(path)


def test_format_1_still_loads_and_says_it_is_unverified(tmp_path):
    path, model, params, _ = saved(tmp_path)
    with h5py.File(path, "r+") as fh:
        del fh.attrs["sha256"]
        fh.attrs["format_version"] = 1
    m, p, _, meta = load_model(path)
    assert m == model and np.array_equal(p, params)
    assert meta == {**META, "unverified": "format 1: no checksum"}


def test_newer_and_foreign_formats_are_refused(tmp_path):
    path = saved(tmp_path)[0]
    with h5py.File(path, "r+") as fh:
        fh.attrs["format_version"] = 3
    with pytest.raises(DataError, match="format_version 3, newer than this lepton reads"):
        load_model(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["params"] = np.zeros(3)
    with pytest.raises(DataError, match="is not a lepton model"):
        load_model(other)

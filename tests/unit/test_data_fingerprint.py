"""The data fingerprint: the same content gives the same fingerprint wherever and however it is
stored; a changed shape, type or sampled value is reported in one line."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from lepton_hpc.data.fingerprint import compare_fingerprints, fingerprint, sample_rows
from lepton_hpc.errors import DataError

WHAT = "the checkpoint"


def _write(path, X, y, **kw):
    with h5py.File(path, "w") as fh:
        fh.create_dataset("X", data=X, **kw)
        if y is not None:
            fh.create_dataset("y", data=y, **kw)
    return path


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(1_000, 5)).astype(np.float32), rng.integers(0, 2, 1_000).astype(float)


def test_sample_rows_are_evenly_spaced_from_the_first_to_the_last():
    rows = sample_rows(1_000)
    assert rows.size == 64 and rows[0] == 0 and rows[-1] == 999
    assert np.all(np.diff(rows)[:-1] == 15) and 15 <= rows[-1] - rows[-2] < 15 + 63
    big = sample_rows(4_000_000)
    assert big[-1] == 3_999_999 and np.ptp(np.diff(big)) < 63
    assert sample_rows(10).tolist() == list(range(10))
    assert sample_rows(1).tolist() == [0] and sample_rows(0).size == 0


def test_the_fingerprint_is_json_and_names_what_it_read(tmp_path, data):
    X, y = data
    path = _write(tmp_path / "d.h5", X, y)
    fp = fingerprint(str(path), "X", "y")
    assert json.loads(json.dumps(fp)) == fp
    assert fp["path"] == str(path.resolve()) and fp["bytes"] == path.stat().st_size
    assert (fp["x"], fp["y"], fp["shape_x"], fp["shape_y"]) == ("X", "y", [1_000, 5], [1_000])
    assert (fp["dtype_x"], fp["dtype_y"]) == ("float32", "float64")
    assert len(fp["sample_sha256"]) == 64
    no_y = fingerprint(str(path), "X", None)
    assert no_y["shape_y"] is None and no_y["dtype_y"] is None


def test_the_same_content_elsewhere_or_stored_otherwise_compares_equal(tmp_path, data):
    X, y = data
    a = fingerprint(str(_write(tmp_path / "a.h5", X, y)), "X", "y")
    moved = tmp_path / "moved" / "b.h5"
    moved.parent.mkdir()
    shutil.copy(tmp_path / "a.h5", moved)
    b = fingerprint(str(moved), "X", "y")
    assert b["path"] != a["path"] and compare_fingerprints(a, b, WHAT) is None
    for kw in ({"chunks": True, "compression": "gzip", "shuffle": True}, {"compression": "lzf"}):
        c = fingerprint(str(_write(tmp_path / "c.h5", X, y, **kw)), "X", "y")
        assert c["bytes"] != a["bytes"] and c == {**a, "path": c["path"], "bytes": c["bytes"]}
    with h5py.File(tmp_path / "be.h5", "w") as fh:  # byte order is storage, not content
        fh.create_dataset("X", data=X, dtype=">f4")
        fh.create_dataset("y", data=y, dtype=">f8")
    assert compare_fingerprints(a, fingerprint(str(tmp_path / "be.h5"), "X", "y"), WHAT) is None
    # the reader's shapes: a 1-D X is one feature, a (n, 1) y one target
    one = fingerprint(str(_write(tmp_path / "one.h5", X[:, 0], y)), "X", "y")
    col = fingerprint(str(_write(tmp_path / "col.h5", X[:, :1], y[:, None])), "X", "y")
    assert one["shape_x"] == [1_000, 1] and col["shape_y"] == [1_000]
    assert compare_fingerprints(one, col, WHAT) is None


def test_an_externally_linked_data_set_has_the_fingerprint_of_its_content(tmp_path, data):
    X, y = data
    plain = fingerprint(str(_write(tmp_path / "plain.h5", X, y)), "X", "y")
    _write(tmp_path / "other.h5", X, y)
    with h5py.File(tmp_path / "link.h5", "w") as fh:
        fh.create_dataset("pad", data=np.arange(100.0))
        fh["X"] = h5py.ExternalLink("other.h5", "/X")
        fh["g/y"] = h5py.ExternalLink("other.h5", "/y")
    linked = fingerprint(str(tmp_path / "link.h5"), "X", "g/y")
    assert linked["sample_sha256"] == plain["sample_sha256"]
    assert compare_fingerprints(plain, linked, WHAT) is None


def test_one_changed_value_in_a_sampled_row_is_reported(tmp_path, data):
    X, y = data
    old = fingerprint(str(_write(tmp_path / "old.h5", X, y)), "X", "y")
    row = int(sample_rows(1_000)[17])
    X2 = X.copy()
    X2[row, 3] = np.nextafter(X2[row, 3], np.float32(np.inf))  # one ulp
    new = fingerprint(str(_write(tmp_path / "new.h5", X2, y)), "X", "y")
    assert compare_fingerprints(old, new, WHAT) == (
        f"'{tmp_path / 'new.h5'}:X': rows differ from those the checkpoint was trained on "
        "(sampled-row hash)"
    )
    y2 = y.copy()
    y2[-1] = 1 - y2[-1]  # the last row is always sampled
    new_y = fingerprint(str(_write(tmp_path / "y.h5", X, y2)), "X", "y")
    assert "rows differ" in compare_fingerprints(old, new_y, WHAT)


def test_a_changed_shape_or_dtype_is_reported_by_name(tmp_path, data):
    X, y = data
    old = fingerprint(str(_write(tmp_path / "old.h5", X, y)), "X", "y")
    fewer = fingerprint(str(_write(tmp_path / "new.h5", X[:900], y[:900])), "X", "y")
    assert compare_fingerprints(old, fewer, WHAT) == (
        f"'{tmp_path / 'new.h5'}:X' has shape (900, 5) but the checkpoint was trained on "
        f"'{tmp_path / 'old.h5'}:X' with shape (1000, 5)"
    )
    wider = fingerprint(str(_write(tmp_path / "w.h5", np.hstack([X, X[:, :1]]), y)), "X", "y")
    assert "has shape (1000, 6)" in compare_fingerprints(old, wider, WHAT)
    f64 = fingerprint(str(_write(tmp_path / "f64.h5", X.astype(np.float64), y)), "X", "y")
    assert compare_fingerprints(old, f64, WHAT) == (
        f"'{tmp_path / 'f64.h5'}:X' has dtype float64 but the checkpoint was trained on "
        f"'{tmp_path / 'old.h5'}:X' with dtype float32"
    )
    two = fingerprint(str(_write(tmp_path / "two.h5", X, np.stack([y, y], 1))), "X", "y")
    assert compare_fingerprints(old, two, WHAT) == (
        f"'{tmp_path / 'two.h5'}:y' has shape (1000, 2) but the checkpoint was trained on "
        f"'{tmp_path / 'old.h5'}:y' with shape (1000,)"
    )
    no_y = fingerprint(str(tmp_path / "old.h5"), "X", None)
    assert "has no targets" in compare_fingerprints(old, no_y, WHAT)


def test_old_fingerprints_without_a_key_are_compared_on_what_they_have(tmp_path, data):
    X, y = data
    fp = fingerprint(str(_write(tmp_path / "d.h5", X, y)), "X", "y")
    assert compare_fingerprints({"shape_x": [1_000, 5]}, fp, WHAT) is None
    assert "shape" in compare_fingerprints({"shape_x": [10, 5]}, fp, WHAT)


def test_a_missing_file_or_data_set_is_a_data_error(tmp_path, data):
    with pytest.raises(DataError, match="does not exist"):
        fingerprint(str(tmp_path / "none.h5"), "X", "y")
    path = _write(tmp_path / "d.h5", *data)
    with pytest.raises(DataError, match="has no data set 'Z'"):
        fingerprint(str(path), "Z", "y")

"""Shards: resolving a list or glob to files, checking they agree, the global row map, reading a
rank's block across files, and the fingerprint over all shards (in-process, one rank)."""

from __future__ import annotations

import itertools
import shutil
import sys

import h5py
import numpy as np
import pytest

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.config import load_config
from lepton_hpc.data import reader, shards
from lepton_hpc.data.fingerprint import compare_fingerprints, fingerprint
from lepton_hpc.data.reader import inspect_spec, read_block
from lepton_hpc.errors import ConfigError, DataError, LeptonError
from lepton_hpc.log import Log
from tests.conftest import write_h5

WHAT = "checkpoint 'c.h5'"
CUTS = [0, 1, 41, 48, 90, 120]  # a 1-row shard first, a 7-row one in the middle


def _data(n: int = 120, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 3, n).astype(np.float64)


def _split(tmp_path, X, y, cuts=CUTS, name="part", chunked=(2,)) -> list[str]:
    """Files ``name-i.h5`` holding rows cuts[i]:cuts[i+1]; shards in ``chunked`` are chunked and
    compressed (read through h5py), the others contiguous (read with pread)."""
    paths = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        path = tmp_path / f"{name}-{i}.h5"
        with h5py.File(path, "w") as fh:
            if i in chunked:
                fh.create_dataset("X", data=X[a:b], chunks=(1, X.shape[1]), compression="gzip")
            else:
                fh["X"] = X[a:b]
            fh["y"] = y[a:b]
        paths.append(str(path))
    return paths


def _log() -> Log:
    return Log(0, 1, sys.stdout)


# ---- resolution ---------------------------------------------------------------------------
def test_resolve_keeps_list_order_and_sorts_a_glob(tmp_path):
    for name in ("b.h5", "a.h5", "c.h5", "a.txt"):
        (tmp_path / name).write_bytes(b"")
    listed = [str(tmp_path / n) for n in ("c.h5", "a.h5", "b.h5")]
    assert shards.resolve(listed) == listed
    assert shards.resolve(str(tmp_path / "*.h5")) == sorted(listed)
    assert shards.resolve(str(tmp_path / "a.h5")) == [str(tmp_path / "a.h5")]
    odd = tmp_path / "x[1].h5"  # a file whose name holds glob characters is itself
    odd.write_bytes(b"")
    assert shards.resolve(str(odd)) == [str(odd)]


def test_empty_glob_and_empty_list_are_one_clear_error(tmp_path):
    pattern = str(tmp_path / "nothing-*.h5")
    with pytest.raises(DataError, match=r"data.train '.*nothing-\*\.h5': no file matches"):
        shards.resolve(pattern, "data.train")
    with pytest.raises(DataError, match="empty"):
        shards.resolve([])


# ---- mismatched shards ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"X": np.ones((4, 6), np.float32), "y": np.zeros(4)}, "has 6 features but"),
        ({"X": np.ones((4, 5), np.int32), "y": np.zeros(4)}, "'X' holds integer values"),
        ({"X": np.ones((4, 5), np.float32)}, "has no data set 'y'"),
        ({"X": np.ones((4, 5), np.float32), "y": np.zeros((4, 2))}, "has 2 targets per row"),
        ({"X": np.ones((4, 5), np.float32), "y": np.zeros(4, np.int64)}, "'y' holds integer"),
    ],
)
def test_mismatched_shard_is_named(tmp_path, bad, message):
    X, y = _data()
    good = write_h5(tmp_path / "good.h5", X, y)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        for key, value in bad.items():
            fh[key] = value
    with pytest.raises(DataError, match=message) as err:
        inspect_spec([str(good), str(other)], "X", "y")
    assert str(other) in str(err.value)


def test_float32_and_float64_shards_read_as_float64(tmp_path):
    X, y = _data()
    a = write_h5(tmp_path / "a.h5", X[:50], y[:50])
    b = write_h5(tmp_path / "b.h5", X[50:].astype(np.float64), y[50:])
    block = read_block([str(a), str(b)], "X", "y", SerialComm(), _log())
    assert block.X.dtype == np.float64
    assert np.array_equal(block.X, X.astype(np.float64))


def test_too_few_rows_for_the_ranks(tmp_path):
    X, y = _data(3)
    paths = _split(tmp_path, X, y, cuts=[0, 1, 3], chunked=())
    with pytest.raises(DataError, match="has 3 rows, fewer than the 4 ranks"):
        inspect_spec(paths, "X", "y", min_rows=4)


# ---- the row map ------------------------------------------------------------------------------
def test_row_map_against_brute_force():
    infos = [type("I", (), {"n_rows": n})() for n in (1, 40, 7, 42, 30)]
    starts = shards.offsets(infos)
    owner = np.repeat(np.arange(5), [1, 40, 7, 42, 30])
    local = np.concatenate([np.arange(n) for n in (1, 40, 7, 42, 30)])
    got_shard, got_local = shards.locate(starts, np.arange(120))
    assert np.array_equal(got_shard, owner) and np.array_equal(got_local, local)
    for start, stop in ((0, 120), (0, 1), (1, 48), (45, 46), (47, 91), (119, 120)):
        parts = shards.pieces(starts, start, stop)
        rows = np.concatenate([np.arange(lo, hi) + starts[i] for i, lo, hi, _ in parts])
        assert np.array_equal(rows, np.arange(start, stop))
        sizes = [hi - lo for _, lo, hi, _ in parts]
        assert [at for *_, at in parts] == list(np.cumsum([0, *sizes])[:-1])


# ---- reading a rank's block -------------------------------------------------------------------
class _Comm(SerialComm):
    """One process that believes it is rank ``rank`` of ``size`` (to read other ranks' blocks)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    @property
    def is_root(self) -> bool:
        return True


@pytest.mark.parametrize("aligned", [False, True])
def test_blocks_across_files_equal_one_file(tmp_path, monkeypatch, aligned):
    X, y = _data()
    one = str(write_h5(tmp_path / "one.h5", X, y))
    paths = _split(tmp_path, X, y)
    calls = []
    real = reader.pread_rows
    monkeypatch.setattr(
        reader, "pread_rows", lambda p, *a, **k: calls.append((p, a[2].dtype)) or real(p, *a, **k)
    )
    for size in (1, 2, 3):
        for rank in range(size):
            comm = _Comm(rank, size)
            want = read_block(one, "X", "y", comm, _log(), aligned=aligned)
            got = read_block(paths, "X", "y", comm, _log(), aligned=aligned)
            assert got.start == want.start and got.n == want.n
            assert np.array_equal(got.X, want.X) and np.array_equal(got.y, want.y)
    xs = {p for p, dtype in calls if dtype == np.float32}  # X with pread, y is float64
    assert paths[2] not in xs  # the chunked, compressed X is read through h5py
    assert {paths[0], paths[1], paths[3], paths[4]} <= xs  # the contiguous ones with pread
    assert paths[2] in {p for p, dtype in calls if dtype == np.float64}  # its contiguous y


def test_nonfinite_row_is_named_in_its_shard(tmp_path):
    X, y = _data()
    X[45, 2] = np.nan  # global row 45: row 4 of the 7-row shard (rows 41..47)
    paths = _split(tmp_path, X, y)
    with pytest.raises(LeptonError, match=r"first: row 45: '.*part-2.h5' row 4"):
        read_block(paths, "X", "y", SerialComm(), _log())
    block = read_block(paths, "X", "y", SerialComm(), _log(), nonfinite="drop")
    assert block.n == 119 and 45 not in block.rows


# ---- the fingerprint ----------------------------------------------------------------------------
def test_fingerprint_covers_every_shard_in_order(tmp_path):
    X, y = _data()
    (tmp_path / "a").mkdir()
    paths = _split(tmp_path / "a", X, y)
    fp = fingerprint(paths, "X", "y")
    assert fp["shape_x"] == [120, 5] and len(fp["shards"]) == 5
    assert fingerprint(str(tmp_path / "a" / "part-*.h5"), "X", "y") == fp
    moved = shutil.copytree(tmp_path / "a", tmp_path / "moved")
    same = fingerprint(sorted(str(p) for p in moved.glob("*.h5")), "X", "y")
    assert compare_fingerprints(fp, same, WHAT) is None  # a moved copy is the same data
    reordered = fingerprint([paths[1], paths[0], *paths[2:]], "X", "y")
    assert "shard 0" in compare_fingerprints(fp, reordered, WHAT)
    missing = fingerprint(paths[:-1], "X", "y")
    assert "shape (90, 5)" in compare_fingerprints(fp, missing, WHAT)
    X2 = X.copy()
    X2[60] += 1  # a row of shard 3
    changed = _split(tmp_path, X2, y, name="changed")
    diff = compare_fingerprints(fp, fingerprint(changed, "X", "y"), WHAT)
    assert diff.startswith("shard 3 ") and "changed-3.h5" in diff
    one = fingerprint(paths[1], "X", "y")
    assert fingerprint([paths[1]], "X", "y") == one  # one file in a list is that file


# ---- the config, run inputs and predict's batch rule -----------------------------------------------
def test_config_takes_a_path_a_pattern_or_a_list():
    cfg = load_config(None, ['data.train=["a.h5", "b.h5"]', "data.test=t-*.h5"])
    assert cfg.data.train == ["a.h5", "b.h5"] and cfg.data.test == "t-*.h5"
    assert load_config(None, ['data.train=["a.h5"]']).data.train == "a.h5"
    assert load_config(None, ["data.train=2024.h5"]).data.train == "2024.h5"
    for bad, key in (("[]", "data.train"), ("[1]", r"data.train\[0\]"), ('[""]', "data.train")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"data.train={bad}"])


def test_run_inputs_name_every_shard(tmp_path):
    from lepton_hpc.safety import check_no_input_inside
    from lepton_hpc.training.setup import run_inputs

    X, y = _data()
    (tmp_path / "d").mkdir()
    paths = _split(tmp_path / "d", X, y)
    cfg = load_config(None, [f"data.train={tmp_path}/d/part-*.h5", f"data.test={paths[0]}"])
    found = run_inputs(cfg, None, None)
    assert [found[f"data.train[{i}]"] for i in range(5)] == paths
    assert found["data.test"] == paths[0]
    with pytest.raises(LeptonError, match=r"holds the input data.train\[0\] file"):
        check_no_input_inside(tmp_path / "d", found, "--overwrite: run directory")


def test_predict_batch_rule():
    from lepton_hpc.batch_predict import is_batch

    assert is_batch("in/*.h5", "out/") and is_batch("in/*.h5", "outdir")
    assert not is_batch("in/*.h5", "pred.h5") and not is_batch(["a.h5", "b.h5"], "pred.h5")
    assert is_batch(["a.h5", "b.h5"], "outdir/") and not is_batch("in.h5", "pred.h5")
    assert not is_batch("in.h5", "/tmp")  # one file, an existing directory: refused later


def test_sweep_takes_shards_in_its_base_and_grid(tmp_path):
    from lepton_hpc.sweep.spec import config_for, load_sweep

    spec = tmp_path / "s.toml"
    spec.write_text(
        '[base.data]\ntrain = ["a.h5", "b.h5"]\n[sweep]\nmetric = "train.log_loss"\n'
        '[sweep.grid]\n"data.test" = [["t0.h5", "t1.h5"], "t.h5"]\n'
    )
    sweep = load_sweep(spec)
    cfgs = [config_for(sweep, point, None, tmp_path / "r") for point in sweep.points]
    assert [c.data.train for c in cfgs] == [["a.h5", "b.h5"]] * 2
    assert [c.data.test for c in cfgs] == [["t0.h5", "t1.h5"], "t.h5"]


def test_predict_one_and_evaluate_rows_take_a_list_of_shards(tmp_path):
    """``inference.predict_one`` over shards writes the one file's rows in order (float64 NumPy
    reference); an output that is one of the shards is refused, naming it."""
    import argparse
    import io

    from lepton_hpc import inference
    from lepton_hpc.data.preprocess import Scaler
    from lepton_hpc.models import Model
    from lepton_hpc.models.io import load_model, save_model

    rng = np.random.default_rng(2)
    model = Model("logistic", (4, 1), "tanh", "binary")
    params = rng.normal(size=model.n_params)
    shift, scale = rng.normal(size=4), rng.uniform(1, 2, 4)
    save_model(tmp_path / "m.h5", model, params, Scaler("zscore", shift, scale), {})
    X, y = rng.normal(size=(30, 4)), rng.integers(0, 2, 30).astype(np.float64)
    paths = _split(tmp_path, X, y, cuts=[0, 1, 8, 30], chunked=(1,))
    log = Log(0, 1, io.StringIO())
    out = tmp_path / "pred.h5"
    inference.predict_one(str(tmp_path / "m.h5"), paths, str(out), SerialComm(), log, False)
    Z = (X - shift) / scale
    W, b = params[:4], params[4]
    with h5py.File(out) as fh:
        np.testing.assert_allclose(fh["probabilities"][:, 0], 1 / (1 + np.exp(-(Z @ W + b))))
        assert fh.attrs["data"] == shards.label(paths)
    with pytest.raises(LeptonError, match=r"--out '.*part-1.h5' is the input data\[1\] file"):
        inference.predict_one(str(tmp_path / "m.h5"), paths, paths[1], SerialComm(), log, True)
    spec, _, scaler, meta = load_model(str(tmp_path / "m.h5"))
    args = argparse.Namespace(model=str(tmp_path / "m.h5"), data=paths, x="X", y="y")
    split = inference.load_rows(spec, scaler, meta, args, SerialComm(), log, with_y=True)
    assert np.array_equal(split.y, y) and split.n_global == 30

"""``lepton convert --shards N`` under real ``mpiexec`` at 1, 2 and 3 ranks: the shards, read in
name order, hold bit for bit the rows of the one-file conversion for CSV, NPY and Parquet, with N
divisible by the ranks or not (and ranks without a shard); a bad cell in the last rank's rows
leaves no shard, no temporary and no directory (and an earlier set of shards untouched); training
on the shards' pattern gives the bits of training on the one file.

5,000 rows: more than ``CSV_MARK_ROWS``, so CSV ranks start from a noted byte offset past the
first mark and skip rows to their first.
"""

from __future__ import annotations

import glob
import os

import h5py
import numpy as np
import pytest

from lepton_hpc.data.convert import Options, convert_file
from lepton_hpc.data.convert_shards import CSV_MARK_ROWS
from tests.conftest import lepton, ok, read_params, write_config

N_ROWS = 5000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{format: (input, its one-file conversion)}."""
    root = tmp_path_factory.mktemp("convert_shards")
    rng = np.random.default_rng(11)
    X = rng.normal(size=(N_ROWS, 4))
    y = (X @ np.array([1.0, -0.5, 0.3, 0.0]) + 0.3 * rng.normal(size=N_ROWS) > 0).astype(float)
    csv = root / "d.csv"
    lines = ["f0,f1,f2,f3,label"]
    lines += [",".join(map(repr, [*r.tolist(), float(t)])) for r, t in zip(X, y, strict=True)]
    csv.write_text("\n".join(lines) + "\n")
    npy = root / "d.npy"
    np.save(npy, np.c_[X, y].astype(np.float32))
    made = {"csv": csv, "npy": npy}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        made["parquet"] = root / "d.parquet"
        table = pa.table({**{f"f{j}": X[:, j] for j in range(4)}, "label": y})
        pq.write_table(table, made["parquet"], row_group_size=700)
    except ImportError:
        pass
    out = {}
    for fmt, src in made.items():
        one = root / f"{fmt}.h5"
        convert_file(src, one, Options(chunk_rows=512))
        out[fmt] = (src, one)
    return out


def concatenated(directory):
    files = sorted(glob.glob(str(directory / "part-*.h5")))
    with h5py.File(files[0], "r") as fh:
        names = sorted(fh.keys())
    parts = {name: [] for name in names}
    for f in files:
        with h5py.File(f, "r") as fh:
            assert sorted(fh.keys()) == names and fh["X"].chunks is None
            for name in names:
                parts[name].append(fh[name][()])
    return {k: np.concatenate(v) for k, v in parts.items()}, len(files)


def same_as_one(directory, one):
    got, n_files = concatenated(directory)
    with h5py.File(one, "r") as fh:
        assert sorted(fh.keys()) == sorted(got)
        for name, values in got.items():
            want = fh[name][()]
            assert values.dtype == want.dtype and np.array_equal(values, want), name
    return n_files


@pytest.mark.parametrize(
    ("fmt", "ranks", "shards"),
    [("csv", 1, 3), ("csv", 3, 5), ("npy", 2, 5), ("npy", 3, 2), ("parquet", 2, 3),
     ("parquet", 3, 7)],
)  # fmt: skip
def test_shards_equal_the_one_file_conversion(tmp_path, inputs, fmt, ranks, shards):
    if fmt not in inputs:
        pytest.skip("pyarrow is not installed")
    assert N_ROWS > CSV_MARK_ROWS
    src, one = inputs[fmt]
    out = tmp_path / "shards"
    res = ok(lepton(ranks, "convert", src, "--out", out, "--shards", shards, timeout=120))
    assert res.stdout.count("wrote") == 1 and f"wrote {shards} shard(s)" in res.stdout
    assert same_as_one(out, one) == shards
    assert sorted(os.listdir(out)) == [f"part-{i:05d}.h5" for i in range(shards)]


def test_a_failing_rank_leaves_no_shard_and_keeps_an_earlier_set(tmp_path, inputs):
    src, one = inputs["csv"]
    bad = tmp_path / "bad.csv"
    lines = src.read_text().splitlines()
    lines[4990] = lines[4990].replace(",", ",oops", 1)  # data row 4989: the last rank's rows
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "new"
    res = lepton(3, "convert", bad, "--out", out, "--shards", 4, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("lepton: error") == 1
    assert "row 4989 (line 4991), column 'f1': 'oops" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    # over an earlier set with --force: the earlier shards stay, byte for byte
    kept = tmp_path / "kept"
    ok(lepton(2, "convert", src, "--out", kept, "--shards", 4, timeout=120))
    before = {p: p.read_bytes() for p in kept.iterdir()}
    res = lepton(3, "convert", bad, "--out", kept, "--shards", 4, "--force", timeout=120)
    assert res.returncode == 2 and "'oops" in res.stderr
    assert {p: p.read_bytes() for p in kept.iterdir()} == before
    # and without --force the non-empty directory is one error line, nothing read
    res = lepton(2, "convert", src, "--out", kept, "--shards", 2, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("lepton: error") == 1 and "is not empty" in res.stderr
    assert same_as_one(kept, one) == 4


def test_training_on_the_shards_is_bitwise_the_one_file(tmp_path, inputs):
    """Reproducible mode, 2 ranks, a mini-batch MLP whose batches span the shards."""
    src, one = inputs["csv"]
    out = tmp_path / "shards"
    ok(lepton(3, "convert", src, "--out", out, "--shards", 3, timeout=120))

    def train(data, name):
        cfg = write_config(
            tmp_path / f"{name}.toml",
            {
                "data": {"train": data, "validation_fraction": 0.2, "scale": "zscore"},
                "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
                "optim": {"name": "adam", "lr": 0.01},
                "train": {"epochs": 2, "batch_size": 64, "seed": 3},
                "comm": {"reproducible": True},
                "output": {"dir": str(tmp_path / name), "plot": False},
            },
        )
        ok(lepton(2, "train", cfg, timeout=120))
        return read_params(tmp_path / name / "model.h5")

    want = train(str(one), "run_one")
    got = train(str(out / "part-*.h5"), "run_shards")
    assert np.array_equal(got, want)


def refused(res, needle):
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("lepton: error") == 1 and needle in res.stderr, res.stderr


def test_hostile_outputs_are_one_error_line_at_two_ranks(tmp_path, inputs):
    """--out a file; a shard name linked to the input; --force beside a foreign part file."""
    src, _ = inputs["npy"]
    before = src.read_bytes()
    refused(lepton(2, "convert", src, "--out", src, "--shards", 2, "--force"), "is a file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00001.h5").symlink_to(src)
    res = lepton(2, "convert", src, "--out", out, "--shards", 2, "--force")
    refused(res, "part-00001.h5' is the input data file")
    (out / "part-00001.h5").unlink()
    (out / "part-x.h5").write_text("someone's")
    res = lepton(2, "convert", src, "--out", out, "--shards", 2, "--force")
    refused(res, "holds part-x.h5, which the pattern")
    assert os.listdir(out) == ["part-x.h5"] and src.read_bytes() == before

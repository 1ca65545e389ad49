"""``lepton convert`` of Parquet: values equal to a float64 NumPy reference, column selection,
nulls, refused columns, multi-row-group files read piece by piece, directories and lists of files
as one table, atomic outputs, the message without pyarrow, and a converted file that trains."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lepton_hpc.data.convert import Options, convert_file
from lepton_hpc.data.reader import inspect as reader_inspect
from lepton_hpc.errors import DataError, LeptonError
from tests.conftest import PYTHON, ROOT, lepton, ok, write_config

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def frame(n: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return {
        "a": X[:, 0],
        "b": X[:, 1].astype(np.float32),
        "k": rng.integers(-50, 50, size=n).astype(np.int32),
        "flag": X[:, 2] > 0,
        "label": (X[:, 0] + X[:, 1] > 0).astype(np.int64),
    }


def write_parquet(path, cols: dict, row_group_size: int | None = None, **arrays):
    table = pa.table({**{k: pa.array(v) for k, v in cols.items()}, **arrays})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read(path, x="X", y="y"):
    with h5py.File(path, "r") as fh:
        return fh[x][()], (fh[y][()] if y in fh else None), fh[x].chunks, dict(fh.attrs)


def reference(cols: dict, names: list[str]) -> np.ndarray:
    return np.column_stack([np.asarray(cols[n], dtype=np.float64) for n in names])


def test_round_trip_is_contiguous_and_read_directly(tmp_path):
    cols = frame()
    src = write_parquet(tmp_path / "t.parquet", cols, row_group_size=64)
    out = tmp_path / "t.h5"
    summary = convert_file(src, out, Options(chunk_rows=100))
    assert "500 rows x 4 features" in summary and "column 'label'" in summary
    X, y, chunks, attrs = read(out)
    assert X.dtype == np.float64 and y.dtype == np.float64 and chunks is None  # contiguous
    assert np.array_equal(X, reference(cols, ["a", "b", "k", "flag"]))
    assert np.array_equal(y, cols["label"].astype(np.float64))
    assert list(attrs["columns"]) == ["a", "b", "k", "flag"] and attrs["format"] == "parquet"
    info = reader_inspect(str(out), "X", "y")
    assert info.x_offset is not None and info.y_offset is not None  # the direct reader's layout
    # float32 features only: float32 kept (or --dtype float64)
    f32 = write_parquet(
        tmp_path / "f.parquet", {"u": cols["b"], "v": cols["b"] * 2, "t": cols["a"]}
    )
    convert_file(f32, tmp_path / "f.h5", Options())
    X, y, _, _ = read(tmp_path / "f.h5")
    assert X.dtype == np.float32 and np.array_equal(X, np.c_[cols["b"], cols["b"] * 2])
    convert_file(f32, tmp_path / "f64.h5", Options(dtype="float64"))
    assert np.array_equal(read(tmp_path / "f64.h5")[0], X.astype(np.float64))


def test_column_selection(tmp_path):
    cols = frame()
    src = write_parquet(tmp_path / "t.parquet", cols, name=pa.array(["x"] * 500))
    out = tmp_path / "o.h5"
    convert_file(src, out, Options(columns="a, 2", target_column="label"))
    X, y, _, attrs = read(out)
    assert np.array_equal(X, reference(cols, ["a", "k"])) and list(attrs["columns"]) == ["a", "k"]
    assert np.array_equal(y, cols["label"].astype(np.float64))
    convert_file(src, out, Options(columns="b,k", target_column="-6", force=True, x="g/F"))
    X, y, _, _ = read(out, "g/F")
    assert np.array_equal(X, reference(cols, ["b", "k"])) and np.array_equal(y, cols["a"])
    convert_file(src, out, Options(columns="a,b", no_target=True, force=True))
    X, y, _, _ = read(out)
    assert y is None and np.array_equal(X, reference(cols, ["a", "b"]))
    with pytest.raises(DataError, match=r"no column 'zz' for --columns"):
        convert_file(src, out, Options(columns="a,zz", target_column="label", force=True))
    with pytest.raises(DataError, match=r"'label' is the target and in --columns"):
        convert_file(src, out, Options(columns="a,label", target_column="label", force=True))
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"--columns is for Parquet"):
        convert_file(tmp_path / "x.csv", out, Options(columns="a", force=True))


def test_string_column_is_one_clear_error(tmp_path):
    cols = frame(50)
    src = write_parquet(tmp_path / "s.parquet", cols, name=pa.array(["x"] * 50))
    out = tmp_path / "s.h5"
    # the string column is the default target (the last column)
    with pytest.raises(DataError, match=r"column 'name' has type string: .* --target-column"):
        convert_file(src, out, Options())
    res = lepton(1, "convert", src, "--out", out, "--target-column", "label")
    assert res.returncode == 2 and not out.exists()
    lines = [line for line in res.stderr.splitlines() if line.startswith("lepton")]
    assert len(lines) == 1 and "column 'name' has type string" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "--columns" in lines[0]


def test_nulls_error_or_nan(tmp_path):
    n = 300
    a = np.arange(n, dtype=np.float64)
    mask = np.zeros(n, bool)
    mask[[7, 250]] = True
    k = pa.array(np.arange(n, dtype=np.int64), mask=mask)  # an integer column with nulls
    src = tmp_path / "n.parquet"
    pq.write_table(pa.table({"a": a, "k": k, "label": a % 2}), src, row_group_size=100)
    out = tmp_path / "n.h5"
    with pytest.raises(DataError, match=r"row 7, column 'k': the value is null"):
        convert_file(src, out, Options(chunk_rows=64))
    assert not out.exists()
    convert_file(src, out, Options(chunk_rows=64, missing="nan"))
    X, y, _, _ = read(out)
    want = np.c_[a, np.where(mask, np.nan, np.arange(n))]
    assert np.array_equal(X, want, equal_nan=True) and np.array_equal(y, a % 2)
    # a null in the second row group: the row is counted from the file's start
    pq.write_table(
        pa.table({"a": pa.array(a, mask=mask[::-1]), "label": a}), src, row_group_size=100
    )
    with pytest.raises(DataError, match=r"row 49, column 'a'"):
        convert_file(src, out, Options(chunk_rows=64, force=True))


# Run in a fresh process: Arrow's allocator peak and the Python heap's peak while converting a
# file of many row groups, and how many pieces were written.
PEAK_CODE = """
import sys, tracemalloc, pyarrow as pa, pyarrow.compute, pyarrow.parquet
from lepton_hpc.data import convert
pieces = []
write = convert.write_h5
def counting(source, out, opts, log):
    chunks = source.chunks
    def counted(rows):
        for X, y in chunks(rows):
            pieces.append(X.shape[0])
            yield X, y
    source.chunks = counted
    return write(source, out, opts, log)
convert.write_h5 = counting
tracemalloc.start()
convert.convert_file(sys.argv[1], sys.argv[2], convert.Options(chunk_rows=int(sys.argv[3])))
print(tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory(), len(pieces),
      max(pieces))
"""


def test_many_row_groups_convert_piece_by_piece(tmp_path):
    n, d = 200_000, 8
    rng = np.random.default_rng(5)
    X = rng.normal(size=(n, d))
    y = rng.integers(0, 3, size=n).astype(np.float64)
    src = tmp_path / "big.parquet"
    cols = {f"f{j}": X[:, j] for j in range(d)}
    pq.write_table(pa.table({**cols, "y": y}), src, row_group_size=10_000)
    assert pq.ParquetFile(src).metadata.num_row_groups == 20
    out = tmp_path / "big.h5"
    res = subprocess.run(
        [PYTHON, "-c", PEAK_CODE, str(src), str(out), "2000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    heap, arrow, pieces, largest = map(int, res.stdout.split())
    full = X.nbytes + y.nbytes  # 14.4 MB
    assert pieces == n // 2000 and largest == 2000
    assert heap < full / 8 and arrow < full / 4, (heap, arrow, full)  # the file: 14 MB
    Xh, yh, _, _ = read(out)
    assert Xh.tobytes() == X.tobytes() and yh.tobytes() == y.tobytes()  # bitwise


def test_directory_and_list_of_files_are_one_table(tmp_path):
    parts = [frame(100 + 10 * i, seed=i) for i in range(3)]
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    write_parquet(d / "part-0.parquet", parts[0])
    write_parquet(d / "part-1.parquet", parts[1])
    write_parquet(d / "sub" / "part-2.parquet", parts[2])
    (d / "_SUCCESS").write_text("")
    write_parquet(d / ".hidden.parquet", parts[0])  # temporaries and hidden files are skipped
    want = np.vstack([reference(p, ["a", "b", "k", "flag"]) for p in parts])
    out = tmp_path / "ds.h5"
    res = ok(lepton(2, "convert", d, "--out", out, "--chunk-rows", 50))
    assert res.stdout.count("wrote") == 1 and f"3 files in {d}" in res.stdout
    X, y, _, _ = read(out)
    assert np.array_equal(X, want) and y.size == want.shape[0]
    out2 = tmp_path / "list.h5"
    files = [d / "part-0.parquet", d / "part-1.parquet", d / "sub" / "part-2.parquet"]
    convert_file(files, out2, Options())
    assert np.array_equal(read(out2)[0], want)
    # files that differ in their columns' types are refused, naming the file
    bad = write_parquet(
        tmp_path / "bad.parquet", {**parts[0], "a": parts[0]["a"].astype(np.float32)}
    )
    with pytest.raises(DataError, match=r"bad.parquet' column 'a' has type float"):
        convert_file([files[0], bad], tmp_path / "x.h5", Options())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no Parquet files"):
        convert_file(tmp_path / "empty", tmp_path / "y.h5", Options())


def test_outputs_are_atomic_and_never_an_input(tmp_path):
    src = write_parquet(tmp_path / "t.parquet", frame(20))
    before = src.read_bytes()
    with pytest.raises(LeptonError, match="refusing to overwrite an input"):
        convert_file(src, src, Options(force=True))
    out = tmp_path / "o.h5"
    out.write_text("mine")
    with pytest.raises(LeptonError, match="exists; pass --force"):
        convert_file(src, out, Options())
    assert out.read_text() == "mine" and src.read_bytes() == before
    damaged = tmp_path / "d.parquet"
    damaged.write_bytes(before[: len(before) // 2])
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        convert_file(damaged, out, Options(force=True))
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "o.h5", "t.parquet"]


def test_without_pyarrow_one_clear_message(tmp_path, monkeypatch):
    src = write_parquet(tmp_path / "t.parquet", frame(20))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LeptonError) as err:
        convert_file(src, tmp_path / "o.h5", Options())
    assert str(err.value) == "reading Parquet needs pyarrow: pip install lepton_hpc[parquet]"


def test_pandas_written_file(tmp_path):
    pd = pytest.importorskip("pandas")
    cols = frame(80)
    src = tmp_path / "p.parquet"
    pd.DataFrame(cols).to_parquet(src)  # pandas adds its index and metadata
    convert_file(src, tmp_path / "p.h5", Options(columns="a,b,k,flag", target_column="label"))
    X, y, _, _ = read(tmp_path / "p.h5")
    assert np.array_equal(X, reference(cols, ["a", "b", "k", "flag"]))
    assert np.array_equal(y, cols["label"])


@pytest.mark.parametrize("writer", ["pyarrow", "pandas"])
def test_converted_file_trains_on_two_ranks(tmp_path, writer):
    """A file written by pyarrow (row groups of 128) or by pandas (its index and metadata
    added), converted, trains on two ranks to the accuracy its labels allow."""
    cols = frame(600, seed=2)
    src = tmp_path / "t.parquet"
    if writer == "pandas":
        pd = pytest.importorskip("pandas")
        pd.DataFrame(cols).to_parquet(src)
    else:
        write_parquet(src, cols, row_group_size=128)
    out = tmp_path / "t.h5"
    ok(lepton(1, "convert", src, "--out", out, "--columns", "a,b", "--target-column", "label"))
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "data": {"train": str(out), "scale": "zscore"},
            "model": {"kind": "logistic"},
            "optim": {"name": "lbfgs"},
            "train": {"epochs": 20},
            "output": {"dir": str(tmp_path / "run"), "plot": False},
        },
    )
    ok(lepton(2, "train", cfg))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["train"]["accuracy"] > 0.95

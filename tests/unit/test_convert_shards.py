"""``lepton convert --shards N`` in this process (one rank): the shards, read in name order, hold
bit for bit the rows of the one-file conversion (and of a float64 NumPy reference) for CSV, NPY,
NPZ and Parquet; CSV rows found from rank 0's byte offsets through BOMs, CRLF, blank lines and
quoted cells spanning lines; errors name the same row and line; and the directory rules: a
non-empty directory, --force with foreign and stale files, links, files in the way.

Several ranks writing their groups of shards under real ``mpiexec``: tests/mpi/test_convert_shards.py.
"""

from __future__ import annotations

import glob
import os

import h5py
import numpy as np
import pytest

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data import convert_shards as cs
from lepton_hpc.data.convert import Options, convert_file
from lepton_hpc.errors import DataError, LeptonError
from lepton_hpc.log import Log


def shard(src, out, n, **opts):
    return cs.convert_shards(src, out, Options(**opts), n, SerialComm(), Log())


def read_all(pattern, x="X", y="y"):
    files = sorted(glob.glob(str(pattern)))
    Xs, ys, sizes = [], [], []
    for f in files:
        with h5py.File(f, "r") as fh:
            assert fh[x].chunks is None  # contiguous: read with plain preads
            Xs.append(fh[x][()])
            ys.append(fh[y][()] if y in fh else None)
            sizes.append(fh[x].shape[0])
            assert (
                fh.attrs["shard_count"] == len(files) and fh.attrs["converter"] == "lepton convert"
            )
    Y = None if ys[0] is None else np.concatenate(ys)
    return np.concatenate(Xs), Y, sizes


def read_one(path, x="X", y="y"):
    with h5py.File(path, "r") as fh:
        return fh[x][()], (fh[y][()] if y in fh else None)


def leftovers(directory):
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


def tricky_csv(path, X, y):
    """A BOM, CRLF line ends, blank lines, and quoted cells that span two lines."""
    lines = ["a,b,c,label"]
    for i, (row, t) in enumerate(zip(X, y, strict=True)):
        cells = [repr(v) for v in row.tolist()] + [repr(float(t))]
        if i % 5 == 2:
            cells[1] = f'"\n{cells[1]}"'  # float() ignores the newline inside the quotes
        lines.append(",".join(cells))
        if i % 11 == 3:
            lines.append("")
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    return path


@pytest.mark.parametrize("mark", [1, 7, 4096])
def test_csv_shards_equal_one_file_and_reference(tmp_path, monkeypatch, mark):
    """Marks every row, every 7th row (a rank skips up to 6 rows) and the default."""
    monkeypatch.setattr(cs, "CSV_MARK_ROWS", mark)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(101, 3))
    y = (X[:, 0] > 0).astype(np.float64)
    src = tricky_csv(tmp_path / "t.csv", X, y)
    convert_file(src, tmp_path / "one.h5", Options(chunk_rows=9))
    X1, y1 = read_one(tmp_path / "one.h5")
    assert np.array_equal(X1, X) and np.array_equal(y1, y)
    for n in (1, 4, 7, 101):
        out = tmp_path / f"s{n}"
        summary = shard(src, out, n, chunk_rows=9)
        assert f"wrote {n} shard(s)" in summary and "101 rows" in summary
        Xs, ys, sizes = read_all(out / "part-*.h5")
        assert np.array_equal(Xs, X1) and np.array_equal(ys, y1), n
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert len(sizes) == n and not leftovers(out)
        with h5py.File(out / cs.shard_name(n - 1), "r") as fh:
            assert fh.attrs["first_row"] == 101 - sizes[-1] and fh.attrs["total_rows"] == 101


def test_csv_shard_errors_name_the_global_row_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "CSV_MARK_ROWS", 4)
    text = "x,y,label\n" + "".join(f"{i},{2 * i},{i % 2}\n" for i in range(30))
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace("25,50,1", "25,fifty,1"))
    with pytest.raises(DataError) as one:
        convert_file(bad, tmp_path / "one.h5", Options(chunk_rows=4))
    with pytest.raises(LeptonError) as sharded:
        shard(bad, tmp_path / "s", 3, chunk_rows=4)
    assert str(sharded.value) == str(one.value)
    assert "row 25 (line 27), column 'y': 'fifty' is not a number" in str(one.value)
    assert not (tmp_path / "s").exists()  # created by the command, removed again
    short = tmp_path / "short.csv"
    short.write_text(text.replace("17,34,1\n", "17,34\n"))
    with pytest.raises(LeptonError, match=r"row 17 \(line 19\) has 2 cells, but the header has 3"):
        shard(short, tmp_path / "s", 3)
    with pytest.raises(DataError) as one:
        convert_file(short, tmp_path / "one.h5", Options())
    assert "row 17 (line 19) has 2 cells" in str(one.value)
    # empty cells: an error, or NaN as in the one-file conversion
    gap = tmp_path / "gap.csv"
    gap.write_text(text.replace("9,18,1", "9,,1"))
    with pytest.raises(LeptonError, match=r"row 9 \(line 11\), column 'y': the cell is empty"):
        shard(gap, tmp_path / "s", 2)
    shard(gap, tmp_path / "s", 2, missing="nan")
    Xs, _, _ = read_all(tmp_path / "s" / "part-*.h5")
    assert np.isnan(Xs[9, 1]) and np.isfinite(np.delete(Xs, 9, axis=0)).all()


@pytest.mark.parametrize("how", ["npy", "savez", "savez_compressed"])
def test_npy_and_npz_shards_equal_one_file(tmp_path, how):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(257, 5)).astype(np.float32)
    if how == "npy":
        src = tmp_path / "d.npy"
        np.save(src, data)
        want_X, want_y = data[:, :-1], data[:, -1].astype(np.float64)
    else:
        src = tmp_path / "d.npz"
        getattr(np, how)(src, X=data, y=data[:, :2].astype(np.float64) * 3)
        want_X, want_y = data, data[:, :2].astype(np.float64) * 3
    convert_file(src, tmp_path / "one.h5", Options(chunk_rows=16))
    X1, y1 = read_one(tmp_path / "one.h5")
    assert np.array_equal(X1, want_X) and np.array_equal(y1, want_y)
    for n in (3, 8):
        shard(src, tmp_path / f"s{n}", n, chunk_rows=16)
        Xs, ys, sizes = read_all(tmp_path / f"s{n}" / "part-*.h5")
        assert Xs.dtype == np.float32 and np.array_equal(Xs, X1) and np.array_equal(ys, y1)
        assert sum(sizes) == 257 and max(sizes) - min(sizes) <= 1
    # --no-target, --dtype and data set names carry over
    x = "F" if how == "npy" else "X"  # NPZ: --x is also the member read
    shard(src, tmp_path / "nt", 2, no_target=True, dtype="float64", x=x, y="T")
    Xs, ys, _ = read_all(tmp_path / "nt" / "part-*.h5", x, "T")
    assert ys is None and Xs.dtype == np.float64
    assert np.array_equal(Xs, data.astype(np.float64))


def test_parquet_shards_read_only_their_row_groups(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(3)
    d = tmp_path / "pq"
    d.mkdir()
    cols = []
    for i, n in enumerate((130, 7, 300)):  # 3 files, row groups of 50
        a = rng.normal(size=n)
        k = rng.integers(-9, 9, size=n).astype(np.int32)
        label = (a > 0).astype(np.int64)
        pq.write_table(pa.table({"a": a, "k": k, "label": label}), d / f"f{i}.parquet", 50)
        cols.append(np.c_[a, k, label])
    table = np.concatenate(cols)
    convert_file(d, tmp_path / "one.h5", Options(chunk_rows=32))
    X1, y1 = read_one(tmp_path / "one.h5")
    assert np.array_equal(X1, table[:, :2]) and np.array_equal(y1, table[:, 2])
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, **kw: reads.append(i) or real(self, i, **kw),
    )
    shard(d, tmp_path / "s", 5, chunk_rows=32, columns="k,a")
    Xs, ys, sizes = read_all(tmp_path / "s" / "part-*.h5")
    assert np.array_equal(Xs, table[:, [1, 0]]) and np.array_equal(ys, table[:, 2])
    assert sizes == [88, 88, 87, 87, 87]
    # 3 + 1 + 6 groups; a group is read once per shard that holds some of its rows
    assert 10 <= len(reads) <= 10 + 4
    # rows 263..349: groups 2, 3 and 4 of the third file (its rows 126..212), no other
    reads.clear()
    from lepton_hpc.data.parquet import open_parquet, parquet_files

    src = open_parquet(parquet_files([d]), Options(), rows=(263, 350))
    got = np.concatenate([X for X, _ in src.chunks(1000)])
    assert np.array_equal(got, table[263:350, :2]) and reads == [2, 3, 4]


def test_shards_refused_when_more_than_rows_or_out_of_range(tmp_path):
    src = tmp_path / "d.npy"
    np.save(src, np.arange(12.0).reshape(4, 3))
    with pytest.raises(LeptonError, match=r"--shards 5: .* has only 4 rows, and every shard needs"):
        shard(src, tmp_path / "s", 5)
    for n in (0, -1, cs.MAX_SHARDS + 1):
        with pytest.raises(LeptonError, match=rf"--shards {n} must be between 1 and"):
            shard(src, tmp_path / "s", n)
    assert not (tmp_path / "s").exists()
    shard(src, tmp_path / "s", 4)
    assert sorted(os.listdir(tmp_path / "s")) == [cs.shard_name(i) for i in range(4)]


def test_directory_rules(tmp_path):
    """Non-empty needs --force; --force replaces only this command's names, removes stale
    toolkit shards, and refuses foreign files the pattern would read."""
    rng = np.random.default_rng(4)
    src = tmp_path / "d.npy"
    np.save(src, rng.normal(size=(40, 3)))
    out = tmp_path / "out"
    shard(src, out, 6)
    note = out / "notes.txt"
    note.write_text("mine")
    with pytest.raises(LeptonError, match=r"'.*out' is not empty \(it holds notes.txt, part-0"):
        shard(src, out, 4)
    # --force with N=4 over an earlier N=6: part-00004/5 are the toolkit's: removed after
    summary = shard(src, out, 4, force=True)
    assert sorted(os.listdir(out)) == ["notes.txt", *(cs.shard_name(i) for i in range(4))]
    assert note.read_text() == "mine" and "wrote 4 shard(s)" in summary
    Xs, _, _ = read_all(out / "part-*.h5")
    assert Xs.shape == (40, 2)
    # a file the pattern matches that the toolkit did not write is never removed nor read
    for name in ("part-00007.h5", "part-old.h5"):
        foreign = out / name
        foreign.write_text("not a shard")
        with pytest.raises(LeptonError, match=rf"holds {name}, which the pattern .* would read"):
            shard(src, out, 4, force=True)
        assert foreign.read_text() == "not a shard"
        foreign.unlink()
    # a foreign file under one of this command's names is replaced with --force (the named rule)
    (out / "part-00001.h5").write_text("replace me")
    shard(src, out, 4, force=True)
    assert cs.is_toolkit_shard(out / "part-00001.h5")
    # --out is a file, or below one; a shard name that is a directory
    with pytest.raises(LeptonError, match=r"--out '.*d.npy' is a file: with --shards"):
        shard(src, src, 2, force=True)
    with pytest.raises(LeptonError, match=r"cannot create directory .*: '.*d.npy' is a file"):
        shard(src, src / "sub", 2)
    (out / "part-00002.h5").unlink()
    (out / "part-00002.h5").mkdir()
    with pytest.raises(LeptonError, match=r"shard '.*part-00002.h5' is a directory"):
        shard(src, out, 4, force=True)
    assert not leftovers(out) and not leftovers(tmp_path)


def test_links_and_inputs(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "d.npy"
    np.save(src, rng.normal(size=(20, 3)))
    before = src.read_bytes()
    # --out a link to the input file
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(LeptonError, match=r"is a file: with --shards"):
        shard(src, link, 2, force=True)
    # a shard name that is a link to the input: refused even with --force
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00001.h5").symlink_to(src)
    with pytest.raises(LeptonError, match=r"shard '.*part-00001.h5' is the input data file"):
        shard(src, out, 2, force=True)
    assert src.read_bytes() == before
    # a hard link to it too
    (out / "part-00001.h5").unlink()
    os.link(src, out / "part-00000.h5")
    with pytest.raises(LeptonError, match=r"is the input data file"):
        shard(src, out, 2, force=True)
    (out / "part-00000.h5").unlink()
    # a link to someone's file under a shard name: the link is replaced, the file untouched
    theirs = tmp_path / "theirs.h5"
    theirs.write_text("theirs")
    (out / "part-00000.h5").symlink_to(theirs)
    shard(src, out, 2, force=True)
    assert theirs.read_text() == "theirs" and not (out / "part-00000.h5").is_symlink()
    # --out a link to a directory is followed; the input directory itself is refused
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dirlink").symlink_to(real)
    shard(src, tmp_path / "dirlink", 2)
    assert sorted(os.listdir(real)) == ["part-00000.h5", "part-00001.h5"]
    assert src.read_bytes() == before


def test_input_directory_is_not_the_output(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"a": np.arange(9.0), "y": np.arange(9.0)}), d / "f.parquet")
    with pytest.raises(LeptonError, match=r"--out '.*pq' is the input directory"):
        shard(d, d, 2, force=True)
    assert os.listdir(d) == ["f.parquet"]


def test_parquet_null_is_named_as_in_the_one_file_conversion(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 300
    mask = np.zeros(n, bool)
    mask[163] = True  # in the fourth row group of 50, in the third of 4 shards
    a = pa.array(np.arange(n, dtype=np.float64), mask=mask)
    src = tmp_path / "n.parquet"
    pq.write_table(pa.table({"a": a, "label": np.arange(n) % 2}), src, row_group_size=50)
    with pytest.raises(LeptonError) as one:
        convert_file(src, tmp_path / "one.h5", Options(chunk_rows=16))
    with pytest.raises(LeptonError) as sharded:
        shard(src, tmp_path / "s", 4, chunk_rows=16)
    assert str(sharded.value) == str(one.value) and "row 163, column 'a'" in str(one.value)
    assert not (tmp_path / "s").exists()
    shard(src, tmp_path / "s", 4, chunk_rows=16, missing="nan")
    Xs, ys, _ = read_all(tmp_path / "s" / "part-*.h5")
    assert np.array_equal(Xs[:, 0], np.where(mask, np.nan, np.arange(n)), equal_nan=True)
    assert np.array_equal(ys, np.arange(n) % 2.0)


def test_an_unexpected_error_is_agreed_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A bug while writing shard 2 of 3: every temporary (shard 0's, complete, and 1's) is
    removed, the directory the command made too, and the error carries exit code 1."""
    src = tmp_path / "d.npy"
    np.save(src, np.arange(60.0).reshape(20, 3))
    real = cs.write_table

    def failing(source, path, opts, log, attrs):
        if attrs["shard_index"] == 2:
            raise RuntimeError("boom")
        return real(source, path, opts, log, attrs)

    monkeypatch.setattr(cs, "write_table", failing)
    with pytest.raises(LeptonError, match=r"rank 0: unexpected RuntimeError: boom") as err:
        shard(src, tmp_path / "s", 3)
    assert err.value.exit_code == 1 and "Traceback" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not leftovers(tmp_path)

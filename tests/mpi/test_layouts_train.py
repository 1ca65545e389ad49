"""Training on chunked and compressed copies of a contiguous file gives the contiguous file's bits.

``lepton train`` under real ``mpiexec`` on 1, 2 and 3 ranks (reproducible mode, whose bits do not
depend on the rank count; gzip, plain chunks, and hdf5plugin's LZ4, Blosc, bitshuffle, bzip2,
Blosc2, ZFP and bitshuffle with zstd, and HDF5's szip) and on 2 ranks in the default mode (gzip and
shuffle+lzf): the copies are read chunk by chunk with ``pread`` and decoded on the ranks'
threads (chunks splitting columns, row blocks starting and ending mid-chunk, partial edge
chunks, a (n, 1) target column stored chunked with a checksum, a contiguous target next to
compressed features), and must give the same final parameters bit for bit.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.conftest import lepton, ok, read_params, write_config

N, D = 1_000, 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts_train")
    rng = np.random.default_rng(11)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X @ rng.normal(size=D) + 0.3 * rng.normal(size=N) > 0).astype(np.float64)
    out = {}
    with h5py.File(root / "plain.h5", "w") as fh:
        fh["X"], fh["y"] = X, y
    out["plain"] = root / "plain.h5"
    with h5py.File(root / "chunked.h5", "w") as fh:  # chunks split rows and columns
        fh.create_dataset("X", data=X, chunks=(97, 4))
        fh.create_dataset("y", data=y[:, None], chunks=(130, 1), fletcher32=True)
    out["chunked"] = root / "chunked.h5"
    with h5py.File(root / "gzip.h5", "w") as fh:
        fh.create_dataset("X", data=X, chunks=(150, D), compression="gzip", shuffle=True)
        fh["y"] = y  # contiguous: read with pread next to the decoded features
    out["gzip"] = root / "gzip.h5"
    with h5py.File(root / "lzf.h5", "w") as fh:  # edge chunks of lzf: through h5py
        fh.create_dataset("X", data=X, chunks=(128, D), compression="lzf", shuffle=True)
        fh.create_dataset("y", data=y, chunks=(300,), compression="lzf")
    out["lzf"] = root / "lzf.h5"
    if h5py.h5z.filter_avail(h5py.h5z.FILTER_SZIP):  # HDF5's szip (libaec), optional there
        with h5py.File(root / "szip.h5", "w") as fh:  # most X chunks stay raw (mask bit set)
            szip = {"compression": "szip", "shuffle": True}
            fh.create_dataset("X", data=X, chunks=(128, D), compression_opts=("nn", 16), **szip)
            fh.create_dataset("y", data=y, chunks=(300,), compression_opts=("ec", 8), **szip)
        out["szip"] = root / "szip.h5"
    try:  # hdf5plugin's filters, decoded on the ranks' threads when their packages are
        import hdf5plugin  # installed (``make install`` installs them)
    except ImportError:
        return out
    with h5py.File(root / "lz4.h5", "w") as fh:  # blocks of 1,000 bytes inside each chunk
        fh.create_dataset("X", data=X, chunks=(128, D), shuffle=True, **hdf5plugin.LZ4(1000))
        fh["y"] = y
    out["lz4"] = root / "lz4.h5"
    with h5py.File(root / "blosc.h5", "w") as fh:
        blosc = hdf5plugin.Blosc
        fh.create_dataset("X", data=X, chunks=(97, 4), **blosc("zstd", 5, blosc.BITSHUFFLE))
        fh.create_dataset("y", data=y, chunks=(300,), **blosc("lz4", 5, blosc.SHUFFLE))
    out["blosc"] = root / "blosc.h5"
    with h5py.File(root / "bitshuffle.h5", "w") as fh:  # with LZ4 (blocks of 64), and alone
        fh.create_dataset("X", data=X, chunks=(200, D), **hdf5plugin.Bitshuffle(64, "lz4"))
        fh.create_dataset("y", data=y, chunks=(300,), **hdf5plugin.Bitshuffle(cname="none"))
    out["bitshuffle"] = root / "bitshuffle.h5"
    with h5py.File(root / "bzip2.h5", "w") as fh:  # chunks splitting columns; with shuffle
        fh.create_dataset("X", data=X, chunks=(150, 3), **hdf5plugin.BZip2(), shuffle=True)
        fh.create_dataset("y", data=y, chunks=(300,), **hdf5plugin.BZip2(blocksize=1))
    out["bzip2"] = root / "bzip2.h5"
    with h5py.File(root / "blosc2.h5", "w") as fh:  # chunks splitting columns
        blosc2 = hdf5plugin.Blosc2
        fh.create_dataset("X", data=X, chunks=(101, 4), **blosc2(filters=blosc2.BITSHUFFLE))
        fh.create_dataset("y", data=y, chunks=(300,), **blosc2(cname="lz4"))
    out["blosc2"] = root / "blosc2.h5"
    with h5py.File(root / "zfp.h5", "w") as fh:  # ZFP lossless (reversible), bitshuffle+zstd
        fh.create_dataset("X", data=X, chunks=(128, 4), **hdf5plugin.Zfp(reversible=True))
        fh.create_dataset("y", data=y, chunks=(300,), **hdf5plugin.Bitshuffle(cname="zstd"))
    out["zfp"] = root / "zfp.h5"
    from lepton_hpc.data import chunk_read

    if hdf5plugin.SZ3_ID in chunk_read.FILTERS:  # lossy: against its values as h5py decodes them
        with h5py.File(root / "sz3.h5", "w") as fh:
            fh.create_dataset("X", data=X, chunks=(128, D), **hdf5plugin.SZ3(absolute=1e-3))
            fh["y"] = y
        with h5py.File(root / "sz3.h5", "r") as src, h5py.File(root / "sz3_values.h5", "w") as fh:
            fh["X"], fh["y"] = src["X"][:], y
        out["sz3"], out["sz3_values"] = root / "sz3.h5", root / "sz3_values.h5"
    return out


def _train(tmp_path, data, ranks: int, reproducible: bool) -> bytes:
    name = f"{data.stem}-{ranks}-{int(reproducible)}"
    cfg = write_config(
        tmp_path / f"{name}.toml",
        {
            "data": {"train": str(data), "validation_fraction": 0.2, "scale": "zscore"},
            "model": {"kind": "mlp", "hidden": [5], "activation": "tanh"},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 2, "batch_size": 64, "seed": 4},
            "comm": {"reproducible": reproducible},
            "output": {"dir": str(tmp_path / name), "plot": False},
        },
    )
    ok(lepton(ranks, "train", cfg, timeout=120))
    return read_params(tmp_path / name / "model.h5").tobytes()


def test_chunked_and_compressed_copies_train_to_the_contiguous_bits(tmp_path, files):
    # Reproducible mode gives the same bits at every rank count, so one run on the plain file is
    # the reference for every copy at 1, 2 and 3 ranks.
    want = _train(tmp_path, files["plain"], 1, True)
    runs = [
        ("gzip", 1),
        ("chunked", 2),
        ("gzip", 3),
        ("lz4", 2),
        ("blosc", 3),
        ("bitshuffle", 2),
        ("bzip2", 3),
        ("blosc2", 2),
        ("zfp", 3),
        ("szip", 2),
    ]
    for layout, ranks in runs:
        if layout in files:
            assert _train(tmp_path, files[layout], ranks, True) == want, (layout, ranks)


def test_a_lossy_plugin_trains_to_the_bits_of_its_decoded_values(tmp_path, files):
    """SZ3 chunks decoded on 3 ranks' threads by the plugin's private instance (no HDF5 in the
    threads) train to the bits of a contiguous file of the values h5py decodes."""
    if "sz3" not in files:
        pytest.skip("hdf5plugin's SZ3 is not available")
    want = _train(tmp_path, files["sz3_values"], 1, True)
    assert _train(tmp_path, files["sz3"], 3, True) == want


def test_default_mode_on_a_compressed_copy_gives_the_contiguous_bits(tmp_path, files):
    want = _train(tmp_path, files["plain"], 2, False)
    for layout in ("gzip", "lzf"):
        assert _train(tmp_path, files[layout], 2, False) == want, layout

"""Mini-batches and the validation split depend on (seed, epoch, global row) only, not on ranks."""

import itertools

import numpy as np
import pytest

from lepton_hpc.data.batches import EpochBatches, local_batches, permute, uniform
from lepton_hpc.data.dataset import validation_mask
from lepton_hpc.data.reader import row_block


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permute_is_a_bijection_and_depends_on_epoch(n):
    idx = np.arange(n)
    p0 = permute(idx, n, seed=5, epoch=0)
    assert np.array_equal(np.sort(p0), idx)
    if n > 16:
        p1 = permute(idx, n, seed=5, epoch=1)
        assert not np.array_equal(p0, p1)
        assert not np.array_equal(p0, permute(idx, n, seed=6, epoch=0))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_global_batches_do_not_depend_on_rank_count(size):
    n, batch = 1003, 64
    single = local_batches(np.arange(n), n, batch, seed=3, epoch=2)
    reference = [set(b.tolist()) for b in single]
    assert sum(len(b) for b in reference) == n
    assert all(len(b) == batch for b in reference[:-1])
    union = [set() for _ in reference]
    for r in range(size):
        lo, hi = row_block(n, r, size)
        parts = local_batches(np.arange(lo, hi), n, batch, seed=3, epoch=2)
        assert len(parts) == len(reference)  # every rank takes part in every step
        for k, part in enumerate(parts):
            union[k] |= {lo + int(i) for i in part}
    assert union == reference


def test_full_batch_is_one_step():
    (only,) = local_batches(np.arange(5, 10), 20, 0, seed=1, epoch=0)
    assert only.tolist() == [0, 1, 2, 3, 4]


def test_uniform_and_validation_mask_are_keyed_by_row():
    rows = np.arange(100_000)
    u = uniform(rows, seed=1, stream=1)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    mask = validation_mask(rows, 0.2, seed=9)
    assert abs(mask.mean() - 0.2) < 0.01
    assert np.array_equal(mask[500:900], validation_mask(rows[500:900], 0.2, seed=9))
    assert not validation_mask(rows, 0.0, seed=9).any()


def _permute_numpy(index, n, seed, epoch):
    """The permutation written with NumPy arrays, the reference for the Numba version."""
    from lepton_hpc.data.batches import mix64

    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    lo_mask, m32 = np.uint64((1 << half) - 1), np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        keys = mix64(np.arange(4, dtype=np.uint64) + np.uint64(seed * 7919 + epoch * 104_729))

        def fmix32(h):
            h = h ^ (h >> np.uint64(16))
            h = (h * np.uint64(0x85EBCA6B)) & m32
            h = h ^ (h >> np.uint64(13))
            h = (h * np.uint64(0xC2B2AE35)) & m32
            return h ^ (h >> np.uint64(16))

        def feistel(v):
            left, right = v >> np.uint64(half), v & lo_mask
            for k in keys & m32:
                left, right = right, left ^ (fmix32((right ^ k) & m32) & lo_mask)
            return (left << np.uint64(half)) | right

        out = feistel(index.astype(np.uint64))
        todo = out >= np.uint64(n)
        while todo.any():
            out[todo] = feistel(out[todo])
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


@pytest.mark.parametrize("n", [2, 17, 1000, 65_537, 1_000_003])
def test_permute_equals_the_numpy_reference(n):
    idx = np.arange(n)
    assert np.array_equal(permute(idx, n, seed=11, epoch=3), _permute_numpy(idx, n, 11, 3))


@pytest.mark.parametrize("n", [2**31 + 11, 3 * 2**40 + 5, 2**62 + 1])
def test_permute_of_many_rows_equals_the_numpy_reference(n):
    """Halves of 16 to 32 bits: the network's 32-bit lanes hold them whole."""
    idx = np.unique(np.random.default_rng(n % 1000).integers(0, n, 5_000))
    assert np.array_equal(permute(idx, n, seed=5, epoch=2), _permute_numpy(idx, n, 5, 2))


@pytest.mark.parametrize(
    ("first", "m", "n", "per"),
    [
        (0, 1, 2, 1),
        (3, 5_000, 10_007, 64),
        (37, 200_000, 300_001, 100),
        (0, 70_000, 70_000, 4096),  # more than one chunk of the 32-bit path, a tail in each
        (2**32 - 70_011, 70_000, 2**32 - 11, 4096),  # the largest n on 32-bit lanes
        (2**32 - 70_011, 70_000, 2**32 - 11, 3000),
        (2**32 - 5_000, 9_000, 2**32 + 3, 4096),  # the 64-bit path, rows either side of 2^32
    ],
)
def test_batch_numbers_of_a_range_equal_the_numpy_reference(first, m, n, per):
    """``_batch_numbers`` (32-bit lanes below n = 2^32, 64-bit above): the reference
    permutation's positions of the rows first .. first + m - 1, cut into batches of ``per``."""
    from lepton_hpc.data.batches import _batch_numbers, _half, _keys

    out = np.empty(m, np.int64)
    _batch_numbers(first, m, n, _half(n), _keys(9, 4), per, out)
    want = _permute_numpy(np.arange(first, first + m, dtype=np.int64), n, 9, 4) // per
    assert np.array_equal(out, want)


@pytest.mark.parametrize("batch", [256, 100, 4097])
def test_batches_are_the_permutation_cut_in_order(batch):
    n, lo, hi = 10_007, 3_000, 7_001
    index = np.arange(lo, hi)
    pos = _permute_numpy(index, n, 4, 1)
    parts = local_batches(index, n, batch, seed=4, epoch=1)
    assert len(parts) == -(-n // batch)
    for k, part in enumerate(parts):
        assert np.array_equal(part, np.flatnonzero(pos // batch == k))  # ascending rows


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
@pytest.mark.parametrize("windows", [[0, 13], [0, 5, 6, 13], [0, 1, 2, 3, 12, 13]])
def test_parallel_windowed_grouping_equals_the_serial_counting_sort(parts, windows):
    """The order made window by window (batches [first, last) at a time) by ``parts`` slices
    in parallel is the serial counting sort's, batch for batch."""
    from lepton_hpc.data.batches import _group, _offsets, _window_order

    rng = np.random.default_rng(parts)
    steps = 13
    for code in (np.int32, np.uint16):
        batch = rng.integers(0, steps, size=10_007).astype(code)
        batch[:50] = 4  # one batch with a run at the start; batch 12 may be rare or empty
        serial = np.empty(batch.size, np.int32)
        s_starts = _group(batch, steps, serial)
        starts, offsets = _offsets(batch, steps, parts)
        assert np.array_equal(s_starts, starts)
        for first, last in itertools.pairwise(windows):
            got = _window_order(batch, starts, offsets, first, last)
            assert len(got) == last - first
            for b, rows in enumerate(got, first):
                assert np.array_equal(rows, serial[starts[b] : starts[b + 1]])
        for b in range(steps):  # each batch holds exactly its rows, ascending
            rows = serial[starts[b] : starts[b + 1]]
            assert np.array_equal(rows, np.flatnonzero(batch == b))


@pytest.mark.parametrize("window_rows", [1, 50, 333, 10**9])
def test_windows_of_the_epoch_order_give_the_same_batches(window_rows):
    """However few rows of order a window holds, every batch is the same (also when asked for
    out of order, and after later windows were made), and the batch numbers are 2 bytes."""
    n, batch = 20_011, 97
    want = [b.copy() for b in EpochBatches(np.arange(3, 9_000), n, batch, 7)(2)]
    plan = EpochBatches(range(3, 9_000), n, batch, 7)
    assert plan.batch.dtype == np.uint16
    plan.window_rows = window_rows
    epoch = plan(2)
    windows = len(epoch.bounds) - 1
    assert windows == len(want) if window_rows == 1 else windows > 1 if window_rows < n else 1
    assert len(epoch) == len(want) == -(-n // batch)
    got = [epoch[k] for k in range(len(epoch))]
    for k in (len(epoch) - 1, 0, len(epoch) // 2, -1):
        assert np.array_equal(epoch[k], want[k])
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(IndexError):
        epoch[len(epoch)]


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("y_cols", [0, 3])
def test_batch_gather_equals_fancy_indexing(parallel, y_cols):
    from lepton_hpc.data.batches import BatchGather

    rng = np.random.default_rng(y_cols)
    X = rng.normal(size=(5_000, 7)).astype(np.float32)
    y = rng.normal(size=(5_000, y_cols) if y_cols else 5_000)
    gather = BatchGather(X, y)
    gather.parallel = parallel
    for m in (1, 17, 1_500, 4_000, 300):  # the buffers grow, then are reused for fewer rows
        rows = np.sort(rng.choice(5_000, size=m, replace=False)).astype(np.int32)
        bx, by = gather(rows)
        assert np.array_equal(bx, X[rows]) and np.array_equal(by, y[rows])
    bx, by = BatchGather(X[:, ::2], y)(rows)  # not C-ordered: NumPy's take
    assert np.array_equal(bx, X[:, ::2][rows]) and np.array_equal(by, y[rows])


@pytest.mark.parametrize(("lo", "hi", "n", "batch"), [(0, 100, 100, 7), (37, 200_000, 300_001, 64)])
def test_a_range_of_rows_gives_the_batches_of_their_index_array(lo, hi, n, batch):
    """A rank's consecutive rows as a ``range`` (no index or position arrays): the same batches."""
    for epoch in (0, 3):
        want = EpochBatches(np.arange(lo, hi, dtype=np.int64), n, batch, 5)(epoch)
        got = EpochBatches(range(lo, hi), n, batch, 5)(epoch)
        assert len(got) == len(want)
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))

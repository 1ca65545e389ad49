"""row_block: contiguous blocks that cover the rows, sizes differing by at most one."""

import itertools

import pytest

from lepton_hpc.data.reader import row_block


@pytest.mark.parametrize("size", range(1, 9))
def test_blocks_cover_rows_in_order_and_balance(size):
    for n in range(41):
        blocks = [row_block(n, r, size) for r in range(size)]
        assert blocks[0][0] == 0
        assert blocks[-1][1] == n
        for (_, a1), (b0, _) in itertools.pairwise(blocks):
            assert a1 == b0
        sizes = [b - a for a, b in blocks]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the remainder goes to the first ranks


def test_known_values():
    assert [row_block(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert row_block(7, 0, 1) == (0, 7)


def test_nonfinite_rows_screen_is_exact():
    import numpy as np

    from lepton_hpc.data.reader import nonfinite_rows

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        X = rng.normal(size=(1000, 7)).astype(dtype)
        big = np.finfo(dtype).max / 2
        X[10] = big  # finite, but its row sum overflows: must not be flagged
        X[20, 3] = np.nan
        X[30, 0] = np.inf
        X[40, 1], X[40, 2] = np.inf, -np.inf
        expected = ~np.isfinite(X).all(axis=1)
        assert np.array_equal(nonfinite_rows(X), expected)
        assert np.flatnonzero(nonfinite_rows(X)).tolist() == [20, 30, 40]
    assert nonfinite_rows(np.zeros((0, 3))).shape == (0,)


def test_nonfinite_rows_of_targets_or_into_the_feature_flags():
    import numpy as np

    from lepton_hpc.data.reader import nonfinite_rows

    bad = np.zeros(200, dtype=bool)
    bad[[5, 70]] = True  # flags from X: never cleared by the screen of y
    y = np.zeros(200)
    y[[70, 71, 199]] = (np.nan, np.inf, -np.inf)
    assert np.flatnonzero(nonfinite_rows(y, out=bad)).tolist() == [5, 70, 71, 199]
    y2 = np.zeros((200, 3), dtype=np.float32)[:, ::2]  # not C-ordered: the NumPy path
    y2[7, 1] = np.nan
    assert np.flatnonzero(nonfinite_rows(y2)).tolist() == [7]

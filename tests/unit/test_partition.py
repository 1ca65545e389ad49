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

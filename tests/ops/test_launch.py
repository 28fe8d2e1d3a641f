"""The tile sizes every row kernel is launched with."""

from __future__ import annotations

import pytest

from fastadv.ops import row_block_sizes


@pytest.mark.parametrize("d", [1, 60, 123, 256, 257, 4096])
def test_block_sizes_are_powers_of_two_within_budget(d):
    block_n, block_d = row_block_sizes(d)
    assert block_d & (block_d - 1) == 0 and block_n & (block_n - 1) == 0
    assert block_d <= 256 and block_d >= min(d, 256) and block_n * block_d <= 2048

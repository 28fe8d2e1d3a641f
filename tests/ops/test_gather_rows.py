"""gather_rows: a gradient on one row set re-addressed to the slots of another."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fastadv.ops import RowSet, gather_rows


@pytest.mark.parametrize("static", [False, True], ids=["compact", "static"])
def test_gather_rows_readdresses_and_zero_fills(static):
    values = torch.arange(12.0, device=DEVICE).view(4, 3)
    value_set = RowSet(torch.tensor([2, 5, 7, 9], device=DEVICE), torch.tensor([3, 1, 0, 2], device=DEVICE))
    if static:  # duplicates: the first slot of each row is the one read
        value_set = RowSet(
            torch.tensor([2, 5, 5, 7, 9], device=DEVICE),
            torch.tensor([3, 1, 2, 0, 2], device=DEVICE),
            torch.tensor([True, True, False, True, True], device=DEVICE),
        )
    rows = torch.tensor([9, 2, 4, 5, 11, 0], device=DEVICE)
    got = gather_rows(values, value_set, rows)
    want = torch.stack([values[2], values[3], torch.zeros(3), values[1], torch.zeros(3), torch.zeros(3)])
    assert torch.equal(got, want.to(DEVICE))
    empty = RowSet(torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(gather_rows(values[:0], empty, rows), torch.zeros(6, 3, device=DEVICE))

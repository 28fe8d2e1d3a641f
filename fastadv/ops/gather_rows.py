"""Re-address a gradient given on one row set to the slots of another. Torch only, no host sync."""

from __future__ import annotations

import torch

from .row_set import RowSet


def gather_rows(values: torch.Tensor, value_set: RowSet, rows: torch.Tensor) -> torch.Tensor:
    """The row of ``values`` for each id in ``rows``; zero for ids ``value_set`` does not hold.

    Args:
        values: [R, D], addressed through ``value_set.grad_rows``.
        value_set: its rows must be sorted (as every RowSet fastadv builds is); with duplicates,
            the first slot of each row is read.
        rows: int64 [N], any order.

    Returns:
        [N, D] in values' dtype. Sync-free: searchsorted, then one gather.
    """
    if len(value_set) == 0:
        return values.new_zeros((rows.numel(), values.shape[1]))
    slot = torch.searchsorted(value_set.rows, rows).clamp_(max=len(value_set) - 1)
    present = value_set.rows[slot] == rows
    gathered = values.index_select(0, value_set.grad_rows[slot])
    return torch.where(present[:, None], gathered, 0.0)

"""Row sets: which rows of a [V, D] weight an op touches, built from token ids without a host sync.

A :class:`RowSet` names N slots. On CUDA (``static_shape``) they are the batch's sorted ids, the first
slot of each distinct row flagged, so N is known to the host; elsewhere ``torch.unique`` compacts
them. :func:`distinct_slots` is the sync-free compaction, shared by the row sets, the segment sums
and the row-gradient lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .checks import check_ids


@dataclass(frozen=True)
class RowSet:
    """The rows an op touches, as N slots.

    Attributes:
        rows: int64 [N], the weight row of each slot.
        grad_rows: int64 [N], the row of the gradient matrix each slot reads: ``rows`` itself for a
            dense [V, D] gradient, positions in ``values`` for a sparse gradient.
        first: bool [N] or None. When given, several slots may name one row and only the flagged
            (first) slot of each row counts; None means the rows are distinct.
        rows_below, grad_rows_below: bounds ``rows`` and ``grad_rows`` are known to lie under (in
            ``[0, bound)``), set where fastadv built them from checked ids, so the ops do not check
            them again on every call; None (a row set built by hand) has the ops check them.
    """

    rows: torch.Tensor
    grad_rows: torch.Tensor
    first: torch.Tensor | None = None
    rows_below: int | None = field(default=None, kw_only=True, compare=False)
    grad_rows_below: int | None = field(default=None, kw_only=True, compare=False)

    def __len__(self) -> int:
        return self.rows.numel()

    def as_slots(self) -> RowSet:
        """The same slots, read from an [N, D] matrix that holds one row per slot."""
        n = len(self)
        return RowSet(self.rows, torch.arange(n, device=self.rows.device), self.first, rows_below=self.rows_below,
                      grad_rows_below=n)  # fmt: skip


def row_set_from_ids(ids: torch.Tensor, num_rows: int, static_shape: bool | None = None) -> RowSet:
    """The distinct rows named by token ids of any shape (int32 or int64), each in [0, num_rows).

    ``static_shape`` (default: True on CUDA) gives min(N, num_rows) slots for N ids, a number the
    host knows, so no host sync is needed to count the distinct ids: the distinct ids first, in
    ascending order and flagged, then unflagged slots repeating the largest id. Otherwise
    ``torch.unique`` compacts them (one sync). Either way no buffer sized by the slots outgrows
    min(N, num_rows) rows: a batch cannot name more distinct rows than it has ids, nor than the
    table has rows.
    """
    flat = ids.reshape(-1).to(torch.int64)
    check_ids("ids", flat, num_rows)
    if static_shape is None:
        static_shape = flat.is_cuda
    if not static_shape:
        rows = torch.unique(flat)
        return RowSet(rows, rows, rows_below=num_rows, grad_rows_below=num_rows)
    slots = distinct_slots(torch.sort(flat).values, num_rows)
    return RowSet(slots.rows, slots.rows, slots.first, rows_below=num_rows, grad_rows_below=num_rows)


class DistinctSlots(NamedTuple):
    """N sorted ids compacted into M = min(N, num_rows) slots (see :func:`distinct_slots`)."""

    rows: torch.Tensor  # int64 [M]: the U distinct ids in order, then M - U copies of the largest
    first: torch.Tensor  # bool [M]: True on the U distinct slots
    slot: torch.Tensor  # int64 [N]: the slot of each sorted id
    run_start: torch.Tensor  # bool [N]: True where a sorted id differs from the one before


def distinct_slots(sorted_ids: torch.Tensor, num_rows: int) -> DistinctSlots:
    """Compact N sorted ids (int64, ascending, each in [0, num_rows)) into min(N, num_rows) slots on
    the device, without a host sync. The repeats of the largest id keep ``rows`` sorted and in range."""
    n = sorted_ids.numel()
    m = min(n, int(num_rows))
    run_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    if n == 0:
        return DistinctSlots(sorted_ids, run_start, sorted_ids, run_start)
    run_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = run_start.cumsum(0).sub_(1)
    rows = scatter_run_starts(sorted_ids, run_start, slot, m, fill=sorted_ids[-1:])
    first = torch.arange(m, device=sorted_ids.device) <= slot[-1]
    return DistinctSlots(rows, first, slot, run_start)


def scatter_run_starts(
    src: torch.Tensor, run_start: torch.Tensor, slot: torch.Tensor, m: int, fill: torch.Tensor
) -> torch.Tensor:
    """[m]: ``src[i]`` at ``slot[i]`` for each run start i, ``fill`` (one element) elsewhere.

    Only run starts are written (the others go to a spare slot that is cut off), so no two writes
    meet: deterministic on every device.
    """
    out = fill.expand(m + 1).clone()
    out.scatter_(0, torch.where(run_start, slot, m), src)
    return out[:m]

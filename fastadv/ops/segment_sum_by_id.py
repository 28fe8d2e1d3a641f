"""Segment sums by token id: one gradient row per distinct id, from one row per token position.

Output-side perturbation keeps dL/de for each position; the weight gradient of the lookup is the
sum of those rows over the positions holding the same id. :func:`segment_sum_by_id` computes it
without touching a V x d table, in the same :class:`RowSet` form the row ops take, so
:func:`fastadv.ops.rows_l2_norm` gives the weight gradient's norm directly.

Kernel: ``kernels/segment_sum_by_id.py`` (``segment_sum_kernel``).
"""

from __future__ import annotations

import torch

from .backend import Backend, kernels, resolve_backend
from .checks import check_ids
from .launch import cdiv, row_launch_options
from .row_set import RowSet, distinct_slots, scatter_run_starts


def _static_segments(
    flat: torch.Tensor, num_rows: int, padding_idx: int | None = None
) -> tuple[RowSet, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The static-shape layout of N ids: M = min(N, num_rows) slots, no host sync.

    Returns:
        (row_set, order [N], slot [N], start [M], end [M]): the positions sorted by id, the slot of
        each sorted position, and each slot's run [start, end) in sorted order, empty for the
        unflagged slots and for ``padding_idx`` (often the longest run, and its sum is 0 anyway).
        ``row_set.grad_rows`` sends an unflagged slot, a repeat of the largest id, to that id's own
        sum, so every slot naming a row reads the same gradient row.
    """
    n = flat.numel()
    sorted_ids, order = torch.sort(flat, stable=True)
    slots = distinct_slots(sorted_ids, num_rows)
    m = slots.rows.numel()
    positions = torch.arange(n, device=flat.device)
    start = scatter_run_starts(positions, slots.run_start, slots.slot, m, fill=positions.new_full((1,), n))
    end = torch.cat([start[1:], positions.new_full((1,), n)])
    if padding_idx is not None:
        end = torch.where(slots.rows == padding_idx, start, end)
    grad_rows = torch.minimum(torch.arange(m, device=flat.device), slots.slot[-1])
    row_set = RowSet(slots.rows, grad_rows, slots.first, rows_below=num_rows, grad_rows_below=m)
    return row_set, order, slots.slot, start, end


def segment_sum_by_id_reference(
    values: torch.Tensor,
    ids: torch.Tensor,
    num_rows: int,
    padding_idx: int | None = None,
    static_shape: bool | None = None,
) -> tuple[RowSet, torch.Tensor]:
    """Torch reference of :func:`segment_sum_by_id`."""
    flat = ids.reshape(-1).to(torch.int64)
    if static_shape is None:
        static_shape = flat.is_cuda
    if not static_shape:
        rows, inverse = torch.unique(flat, return_inverse=True)
        row_set = RowSet(rows, torch.arange(rows.numel(), device=values.device), rows_below=num_rows,
                         grad_rows_below=rows.numel())  # fmt: skip
        sums = torch.zeros(rows.numel(), values.shape[1], dtype=torch.float32, device=values.device)
        sums.index_add_(0, inverse, values.float())
    elif flat.numel() == 0:
        empty = RowSet(flat, flat, flat.bool(), rows_below=num_rows, grad_rows_below=0)
        return empty, values.new_zeros((0, values.shape[1]), dtype=torch.float32)
    else:
        row_set, order, slot, _, _ = _static_segments(flat, num_rows)
        sums = torch.zeros(len(row_set), values.shape[1], dtype=torch.float32, device=values.device)
        slot_of_position = torch.empty_like(slot).scatter_(0, order, slot)  # no [N, d] gather of the values
        sums.index_add_(0, slot_of_position, values.float())
    if padding_idx is not None:
        sums.masked_fill_((row_set.rows == padding_idx)[:, None], 0.0)
    return row_set, sums


def segment_sum_by_id(
    values: torch.Tensor,
    ids: torch.Tensor,
    num_rows: int,
    padding_idx: int | None = None,
    static_shape: bool | None = None,
    backend: Backend | None = None,
) -> tuple[RowSet, torch.Tensor]:
    """Sum the rows of ``values`` that share a token id.

    Args:
        values: [N, D], one row per token position (any float dtype, any strides).
        ids: N token ids, any shape, int32 or int64, each in [0, num_rows).
        num_rows: the table's rows (V): with N ids, at most min(N, V) of them are distinct.
        padding_idx: an id whose sum is 0 (nn.Embedding gives its padding row no gradient); its
            positions are not read.
        static_shape: default True on CUDA: min(N, num_rows) slots (the distinct ids first, flagged)
            so nothing waits for the device to count distinct ids; False compacts with torch.unique.

    Returns:
        (row_set, sums): ``sums`` is fp32 [M, D], M = len(row_set) <= min(N, num_rows), read through
        ``row_set.grad_rows``.
    """
    if values.dim() != 2 or values.shape[0] != ids.numel():
        raise ValueError(f"values must be [N, D] with N = ids.numel() = {ids.numel()}, found {tuple(values.shape)}.")
    check_ids("ids", ids, num_rows)
    backend = backend or resolve_backend(values.device)
    if static_shape is None:
        static_shape = values.is_cuda
    if backend == "torch" or not static_shape or ids.numel() == 0:
        return segment_sum_by_id_reference(values, ids, num_rows, padding_idx, static_shape)
    row_set, order, _, start, end = _static_segments(ids.reshape(-1).to(torch.int64), num_rows, padding_idx)
    return row_set, _segment_sum(values, order, start, end)


# A torch.library custom op (see fastadv.ops.launch): one opaque op to torch.compile, shaped by its fake.
@torch.library.custom_op("fastadv::segment_sum", mutates_args=())
def _segment_sum(values: torch.Tensor, order: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """fp32 [M, D]: row k is the sum of the rows ``values[order[start[k]:end[k]]]`` (0 for an empty run)."""
    m, d = start.numel(), values.shape[1]
    sums = torch.empty(m, d, dtype=torch.float32, device=values.device)  # every element is written
    options = row_launch_options(d)
    kernels().segment_sum_kernel[(m, cdiv(d, options["BLOCK_D"]))](
        values, order, start, end, sums, d, values.stride(0), values.stride(1), **options,
    )  # fmt: skip
    return sums


@_segment_sum.register_fake
def _(values: torch.Tensor, order: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    return values.new_empty((start.numel(), values.shape[1]), dtype=torch.float32)

"""Segment sums by token id: one gradient row per distinct id, from one row per token position.

Output-side perturbation keeps dL/de for each position; the weight gradient of the lookup is the
sum of those rows over the positions holding the same id. :func:`segment_sum_by_id` computes it
without touching a V x d table, in the same :class:`RowSet` form the row ops take, so
:func:`fastadv.ops.rows_l2_norm` gives the weight gradient's norm directly.
"""

from __future__ import annotations

import torch

from .backend import Backend, kernels, resolve_backend
from .rows import RowSet, row_block_sizes

__all__ = ["segment_sum_by_id", "segment_sum_by_id_reference"]


def _sorted_segments(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted ids, positions in sorted order, first-occurrence flags), all [N]; static shapes."""
    sorted_ids, order = torch.sort(ids, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids, order, first


def segment_sum_by_id_reference(
    values: torch.Tensor, ids: torch.Tensor, static_shape: bool | None = None
) -> tuple[RowSet, torch.Tensor]:
    """Torch reference of :func:`segment_sum_by_id`."""
    flat = ids.reshape(-1).to(torch.int64)
    if static_shape is None:
        static_shape = flat.is_cuda
    if not static_shape:
        rows, inverse = torch.unique(flat, return_inverse=True)
        sums = torch.zeros(rows.numel(), values.shape[1], dtype=torch.float32, device=values.device)
        sums.index_add_(0, inverse, values.float())
        return RowSet(rows, torch.arange(rows.numel(), device=values.device)), sums
    sorted_ids, order, first = _sorted_segments(flat)
    n = flat.numel()
    slots = torch.arange(n, device=values.device)
    start = torch.where(first, slots, 0).cummax(dim=0).values  # the first slot of each slot's id
    sums = torch.zeros(n, values.shape[1], dtype=torch.float32, device=values.device)
    sums.index_add_(0, start, values.index_select(0, order).float())
    return RowSet(sorted_ids, slots, first), sums


def segment_sum_by_id(
    values: torch.Tensor, ids: torch.Tensor, static_shape: bool | None = None, backend: Backend | None = None
) -> tuple[RowSet, torch.Tensor]:
    """Sum the rows of ``values`` that share a token id.

    Args:
        values: [N, D], one row per token position (any float dtype, any strides).
        ids: N token ids, any shape, int32 or int64.
        static_shape: default True on CUDA: keep N slots (sorted ids, first-occurrence flags) so
            nothing waits for the device to count distinct ids; False compacts with torch.unique.

    Returns:
        (row_set, sums): ``sums`` is fp32, one row per slot of ``row_set`` (addressed through
        ``row_set.grad_rows``); with flags, only the first slot of each id holds its sum.
    """
    if values.dim() != 2 or values.shape[0] != ids.numel():
        raise ValueError(f"values must be [N, D] with N = ids.numel() = {ids.numel()}, found {tuple(values.shape)}.")
    backend = backend or resolve_backend(values.device)
    if static_shape is None:
        static_shape = values.is_cuda
    if backend == "torch" or not static_shape or ids.numel() == 0:
        return segment_sum_by_id_reference(values, ids, static_shape)
    flat = ids.reshape(-1).to(torch.int64)
    sorted_ids, order, first = _sorted_segments(flat)
    n = flat.numel()
    slots = torch.arange(n, device=values.device)
    # One past each segment's last slot: the next first slot after it (or N), by a reversed cummin.
    next_first = torch.where(first, slots, n)[1:].flip(0).cummin(dim=0).values.flip(0)
    seg_end = torch.cat([next_first, torch.full((1,), n, device=values.device, dtype=torch.int64)])
    sums = _segment_sum(values, order, seg_end, first.view(torch.uint8))
    return RowSet(sorted_ids, slots, first), sums


# A torch.library custom op (see fastadv.ops.rows): one opaque op to torch.compile, shaped by its fake.
@torch.library.custom_op("fastadv::segment_sum", mutates_args=())
def _segment_sum(values: torch.Tensor, order: torch.Tensor, seg_end: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """fp32 [N, D]: on each first slot, the sum of its segment's rows of ``values`` (0 elsewhere)."""
    n, d = order.numel(), values.shape[1]
    sums = torch.zeros(n, d, dtype=torch.float32, device=values.device)
    _, block_d = row_block_sizes(d)
    kernels().segment_sum_kernel[(n, -(-d // block_d))](
        values, order, seg_end, first, sums, n, d, values.stride(0), values.stride(1), BLOCK_D=block_d,
    )  # fmt: skip
    return sums


@_segment_sum.register_fake
def _(values: torch.Tensor, order: torch.Tensor, seg_end: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    return values.new_empty((order.numel(), values.shape[1]), dtype=torch.float32)

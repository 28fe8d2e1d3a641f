"""An embedding lookup whose weight gradient arrives as the rows it touches, not as a V x d matrix.

torch's embedding backward builds the weight gradient densely: a zero-filled [V, d] matrix with the
batch's rows summed into it, which autograd then adds into ``.grad``. When ``.grad`` already holds a
dense gradient (FGM's adversarial pass, PGD's last pass, every FreeLB pass after the first, a later
micro-batch under accumulation, ``zero_grad(set_to_none=False)``), that is a V x d temporary and
two V x d passes for the U rows the batch touched. :func:`row_gradient_lookup` is the same lookup
with a backward that gives autograd the gradient as a sparse COO tensor of those rows, [U, d];
autograd's AccumulateGrad adds it into the dense ``.grad`` in place, one add per row.

The rows are summed by torch's own dense embedding backward (``embedding_dense_backward``), run on
the batch's ids renumbered to their slots among the distinct ids: the same kernel, the same
occurrences in the same order, the same ``scale_grad_by_freq`` counts, so each row's sum is bit for
bit the one the dense backward would write into its zeroed V x d matrix, and ``.grad[row] + sum``
is the add autograd would make. (A segment sum of fastadv's own would be a second implementation
of that sum, which could only differ from it.) A sparse gradient of a module's own
(``nn.Embedding(sparse=True)``) adds each occurrence separately instead, which is not the same
number.

On CUDA the renumbering needs no host sync: min(N, V) slots for N ids, the distinct ids first and
then repeats of the largest with zero rows, so the tensor is left uncoalesced and the add is an
``index_add_`` (the repeats add 0). On the CPU ``torch.unique`` gives the U distinct rows exactly.
"""

from __future__ import annotations

import torch

from .row_set import distinct_slots

__all__ = ["compact_ids", "dense_weight_gradient", "has_dense_gradient", "row_gradient_lookup"]


def compact_ids(
    ids: torch.Tensor, num_rows: int, static_shape: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The distinct ids of ``ids`` and each id's slot among them.

    Args:
        ids: token ids of any shape, int32 or int64, each in [0, num_rows).
        num_rows: the table's rows (V).
        static_shape: default True on CUDA: min(N, V) slots for N ids, a number the host knows (the
            distinct ids ascending, then repeats of the largest), so nothing waits for the device;
            False: ``torch.unique``, exactly the U distinct ids.

    Returns:
        (rows int64 [M], slots int64 [*ids.shape], distinct): ``rows[slots] == ids``; ``distinct``
        says whether ``rows`` holds each id once (sorted), as a coalesced sparse tensor needs.
    """
    flat = ids.reshape(-1).to(torch.int64)
    if static_shape is None:
        static_shape = flat.is_cuda
    if not static_shape or flat.numel() == 0:
        rows, slots = torch.unique(flat, return_inverse=True)
        return rows, slots.view(ids.shape), True
    sorted_ids, order = torch.sort(flat)
    compact = distinct_slots(sorted_ids, num_rows)
    slots = torch.empty_like(flat).scatter_(0, order, compact.slot)  # each position written once
    return compact.rows, slots.view(ids.shape), False


def dense_weight_gradient(
    grad_output: torch.Tensor, ids: torch.Tensor, num_rows: int, padding_idx: int | None, scale_grad_by_freq: bool
) -> torch.Tensor:
    """[V, d]: the gradient torch's embedding backward gives the weight (differentiable)."""
    return torch.ops.aten.embedding_backward(
        grad_output, ids, num_rows, -1 if padding_idx is None else padding_idx, scale_grad_by_freq, False
    )


def has_dense_gradient(weight: torch.Tensor) -> bool:
    """Whether ``weight.grad`` is a plain dense tensor of the weight's shape and dtype, which a sparse
    gradient is added into in place (not a DTensor shard, not a sparse gradient, not missing)."""
    grad = weight.grad
    return (
        grad is not None
        and type(grad) in (torch.Tensor, torch.nn.Parameter)
        and grad.layout == torch.strided
        and grad.shape == weight.shape
        and grad.dtype == weight.dtype
        and grad.is_contiguous()
    )


def _accumulates(ctx) -> bool:
    """Whether this backward pass adds the weight's gradient into ``.grad`` (``loss.backward()``), rather
    than handing it to ``torch.autograd.grad``: torch's engine raises when asked about a leaf there."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return True
    try:
        return bool(will_execute(ctx.next_functions[0][0]))  # the weight's AccumulateGrad
    except RuntimeError:
        return False


class _RowGradientLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None, scale_grad_by_freq: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight  # the parameter itself: the backward reads its .grad at that moment
        ctx.options = (padding_idx, scale_grad_by_freq)
        return torch.embedding(weight, ids)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight, (padding_idx, by_freq) = ctx.weight, ctx.options
        num_rows, d = weight.shape
        # Rows only into a dense .grad, first order: anywhere else (no .grad yet, which the rows would
        # become; a double backward; torch.autograd.grad, whose caller expects the dense tensor) autograd
        # gets what torch's own backward gives. So does fp16 on the CPU, where torch has no sparse +
        # sparse add (two lookups of one table meet in autograd's sum).
        half_on_cpu = weight.dtype == torch.float16 and weight.device.type == "cpu"
        if torch.is_grad_enabled() or half_on_cpu or not has_dense_gradient(weight) or not _accumulates(ctx):
            return dense_weight_gradient(grad_output, ids, num_rows, padding_idx, by_freq), None, None, None
        rows, slots, distinct = compact_ids(ids, num_rows)
        sums = torch.ops.aten.embedding_dense_backward(grad_output, slots, rows.numel(), -1, by_freq)
        if padding_idx is not None:  # the dense backward skips the padding row's occurrences: its sum is 0
            sums = sums.masked_fill_((rows == padding_idx)[:, None], 0.0)
        gradient = torch.sparse_coo_tensor(
            rows[None], sums, (num_rows, d), is_coalesced=distinct, check_invariants=False
        )
        return gradient, None, None, None


def row_gradient_lookup(
    weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None = None, scale_grad_by_freq: bool = False
) -> torch.Tensor:
    """``F.embedding(ids, weight)``, whose weight gradient is the touched rows when ``.grad`` is dense.

    Args:
        weight: the table, [V, d], a leaf that requires grad.
        ids: token ids of any shape (int32 or int64), each in [0, V).
        padding_idx: the row that gets no gradient (as nn.Embedding's), or None.
        scale_grad_by_freq: scale each row's gradient by 1 / its count in ``ids`` (as nn.Embedding's).

    Returns:
        [*ids.shape, d], equal to ``weight[ids]``. In backward, when ``weight.grad`` is a dense tensor,
        the weight's gradient is a sparse [V, d] tensor holding each distinct id's row sum (bitwise
        the dense backward's row), which autograd adds into ``.grad`` in place; otherwise the dense
        [V, d] gradient torch's embedding gives. ``max_norm`` is the module's: renormalize before.
    """
    return _RowGradientLookup.apply(weight, ids, padding_idx, scale_grad_by_freq)

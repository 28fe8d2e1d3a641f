"""The L2 norm of a gradient over the distinct rows of a row set, accumulated in fp32.

Kernel: ``kernels/rows_l2_norm.py`` (``rows_sum_of_squares_kernel``). No host sync.
"""

from __future__ import annotations

import torch

from .backend import Backend, kernels, resolve_backend
from .checks import check_row_set
from .launch import check_matrix, first_flags, row_launch_options, row_programs
from .row_set import RowSet


def rows_l2_norm_reference(grad: torch.Tensor, row_set: RowSet) -> torch.Tensor:
    """Torch reference. grad: [R, D]. Returns a 0-dim fp32 tensor: the L2 norm over the distinct rows.

    An fp32 gradient on distinct rows goes through torch's own norm, the reduction the snippet's
    ``torch.norm(grad)`` runs: over sorted distinct rows it gives the snippet's number (bitwise or
    within an ulp on CPU, where torch's fp32 norm itself is off the exact value by up to ~6e-5 over
    millions of elements). Otherwise (flagged slots, half precision, whose snippet norm is rounded
    to 8 or 11 bits anyway) rows are summed as short fp32 dots, then pairwise.
    """
    g = grad.index_select(0, row_set.grad_rows)
    if row_set.first is None and g.dtype == torch.float32:
        return torch.linalg.vector_norm(g)
    g = g.float()
    per_slot = torch.einsum("nd,nd->n", g, g)
    if row_set.first is not None:
        per_slot = torch.where(row_set.first, per_slot, 0.0)
    return per_slot.sum().sqrt()


def rows_l2_norm(grad: torch.Tensor, row_set: RowSet, backend: Backend | None = None) -> torch.Tensor:
    """The L2 norm of the gradient over the distinct rows of ``row_set``, in fp32 (0-dim tensor).

    grad: [R, D], any float dtype and strides. The kernel is deterministic: one fp32 partial sum of
    squares per program, then a sum.
    """
    check_matrix("grad", grad)
    check_row_set(row_set, None, grad.shape[0])
    backend = backend or resolve_backend(grad.device)
    if backend == "torch" or len(row_set) == 0:
        return rows_l2_norm_reference(grad, row_set)
    partial = _rows_sum_of_squares(grad, row_set.grad_rows, *first_flags(row_set))
    return partial.sum().sqrt()


@torch.library.custom_op("fastadv::rows_sum_of_squares", mutates_args=())
def _rows_sum_of_squares(
    grad: torch.Tensor, grad_rows: torch.Tensor, first: torch.Tensor, has_first: bool
) -> torch.Tensor:
    """fp32 [programs]: one partial sum of squares of the slots' gradient rows per program."""
    n, d = grad_rows.numel(), grad.shape[1]
    partial = torch.empty(row_programs(n, d), dtype=torch.float32, device=grad.device)
    kernels().rows_sum_of_squares_kernel[(partial.numel(),)](
        grad, grad_rows, first, partial, n, d, grad.stride(0), grad.stride(1),
        HAS_FIRST=has_first, **row_launch_options(d),
    )  # fmt: skip
    return partial


@_rows_sum_of_squares.register_fake
def _(grad: torch.Tensor, grad_rows: torch.Tensor, first: torch.Tensor, has_first: bool) -> torch.Tensor:
    return grad.new_empty(row_programs(grad_rows.numel(), grad.shape[1]), dtype=torch.float32)

"""Save the rows of a row set, then add ``epsilon * g / norm`` (or ``epsilon * sign(g)``) in place,
unless the device flag ``ok`` says to skip.

Kernel: ``kernels/rows_backup_add.py``. No host sync. :func:`fastadv.ops.rows_restore` undoes it.
"""

from __future__ import annotations

import torch

from .backend import Backend, kernels, resolve_backend
from .checks import check_row_set
from .launch import check_weight_and_grad, first_flags, row_launch_options, row_programs, step_scalars
from .row_set import RowSet


def rows_backup_add_reference(
    weight: torch.Tensor,
    grad: torch.Tensor,
    row_set: RowSet,
    norm: torch.Tensor,
    ok: torch.Tensor,
    epsilon: float,
    sign: bool = False,
) -> torch.Tensor:
    """Torch reference of :func:`rows_backup_add`. Returns the saved rows, [N, D] in weight's dtype."""
    backup = weight.index_select(0, row_set.rows)
    # One fp32 working copy of the gradient rows (index_select always copies), updated in place:
    # delta = epsilon * g / norm, then the perturbed row = delta + w, in the snippet's order.
    work = grad.index_select(0, row_set.grad_rows).float()
    if sign:
        work.sign_().mul_(epsilon)
    else:
        work.mul_(epsilon).div_(norm)
    work.add_(backup)
    work = work.to(weight.dtype)  # fp32 arithmetic for every storage dtype, as the kernel's
    torch.where(ok, work, backup, out=work)  # a skipped step writes the saved rows back, bit for bit
    # Duplicate slots hold identical values, so copying them all writes each row once in effect.
    weight.index_copy_(0, row_set.rows, work)
    return backup


def rows_backup_add(
    weight: torch.Tensor,
    grad: torch.Tensor,
    row_set: RowSet,
    norm: torch.Tensor,
    ok: torch.Tensor,
    epsilon: float,
    sign: bool = False,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Save the rows of ``weight`` in ``row_set``, then add the perturbation to them in place.

    Args:
        weight: [V, D], fp32/bf16/fp16, any strides; modified in place (pass ``param.data``).
        grad: [R, D], the gradient rows addressed by ``row_set.grad_rows``.
        norm: fp32 0-dim or [1], the gradient's L2 norm (unused when ``sign``).
        ok: bool 0-dim or [1]; False leaves every row bitwise untouched (the device-side skip).
        epsilon: perturbation size; ``sign`` picks ``epsilon * sign(g)`` over ``epsilon * g / norm``.

    Returns:
        The saved rows, [N, D] contiguous in weight's dtype, for :func:`rows_restore`. With
        first-occurrence flags, the kernel saves only the flagged slots (the others hold zeros).
    """
    check_weight_and_grad(weight, grad)
    check_row_set(row_set, weight.shape[0], grad.shape[0])
    backend = backend or resolve_backend(weight.device)
    if backend == "torch":
        return rows_backup_add_reference(weight, grad, row_set, norm, ok, epsilon, sign)
    if len(row_set) == 0:
        return weight.new_empty((0, weight.shape[1]))
    return _rows_backup_add(
        weight, grad, row_set.rows, row_set.grad_rows, *first_flags(row_set), *step_scalars(norm, ok), float(epsilon),
        sign,
    )  # fmt: skip


@torch.library.custom_op("fastadv::rows_backup_add", mutates_args=("weight",))
def _rows_backup_add(
    weight: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    first: torch.Tensor,
    has_first: bool,
    norm: torch.Tensor,
    ok: torch.Tensor,
    epsilon: float,
    sign: bool,
) -> torch.Tensor:
    """Saves the slots' rows ([N, D], returned) and adds the perturbation to ``weight`` in place."""
    n, d = rows.numel(), weight.shape[1]
    # Zeroed: a duplicate slot's row is not written, and an op's output must not depend on stale memory.
    backup = torch.zeros((n, d), dtype=weight.dtype, device=weight.device)
    kernels().rows_backup_add_kernel[(row_programs(n, d),)](
        weight, grad, backup, rows, grad_rows, first, norm, ok, epsilon,
        n, d, weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1),
        SIGN=sign, HAS_FIRST=has_first, **row_launch_options(d),
    )  # fmt: skip
    return backup


@_rows_backup_add.register_fake
def _(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, *args: object) -> torch.Tensor:
    return weight.new_empty((rows.numel(), weight.shape[1]))

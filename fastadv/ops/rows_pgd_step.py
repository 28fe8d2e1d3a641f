"""One projected ascent step of PGD on the rows of a row set, around the saved rows (saving them
first on a round's first step).

Kernels: ``kernels/rows_pgd_step.py`` (ascent, then projection). No host sync.
"""

from __future__ import annotations

import torch

from .backend import Backend, kernels, resolve_backend
from .checks import check_row_set
from .launch import check_weight_and_grad, first_flags, row_launch_options, row_programs, step_scalars
from .row_set import RowSet
from .rows_l2_norm import rows_l2_norm_reference


def rows_pgd_step_reference(
    weight: torch.Tensor,
    grad: torch.Tensor,
    row_set: RowSet,
    backup: torch.Tensor | None,
    norm: torch.Tensor,
    ok: torch.Tensor,
    alpha: float,
    epsilon: float,
) -> torch.Tensor:
    """Torch reference of :func:`rows_pgd_step`. Returns the saved rows, [N, D] in weight's dtype."""
    current = weight.index_select(0, row_set.rows)
    if backup is None:
        backup = current.clone()
    # The snippet's order: w += alpha * g / ||g||; r = w - backup; r = epsilon * r / ||r|| if
    # ||r|| > epsilon; w = backup + r; each rounded to the weight dtype.
    step = grad.index_select(0, row_set.grad_rows).float().mul_(alpha).div_(norm)
    moved = (current.float() + step).to(weight.dtype)
    r = (moved.float() - backup.float()).to(weight.dtype)
    r = torch.where(ok, r, 0.0)
    r_norm = rows_l2_norm_reference(r, row_set.as_slots())
    scaled = torch.where(r_norm > epsilon, r.float().mul(epsilon).div_(r_norm).to(weight.dtype), r)
    projected = (backup.float() + scaled.float()).to(weight.dtype)
    weight.index_copy_(0, row_set.rows, torch.where(ok, projected, current))
    return backup


def rows_pgd_step(
    weight: torch.Tensor,
    grad: torch.Tensor,
    row_set: RowSet,
    backup: torch.Tensor | None,
    norm: torch.Tensor,
    ok: torch.Tensor,
    alpha: float,
    epsilon: float,
    backend: Backend | None = None,
) -> torch.Tensor:
    """One PGD step on the rows of ``row_set``: ascend by ``alpha * g / ||g||``, then project the
    displacement from the saved rows back into the L2 ball of radius ``epsilon``.

    Args:
        weight: [V, D], modified in place (pass ``param.data``).
        grad: [R, D], the gradient rows addressed by ``row_set.grad_rows``.
        backup: the clean rows, [N, D] contiguous in weight's dtype, from an earlier step of this
            round; None on the round's first step, which saves them.
        norm: fp32 0-dim or [1], ``||g||``. ok: bool 0-dim or [1]; False leaves every row untouched.

    Returns:
        The saved rows (``backup``, or the rows just saved), for the next step and for
        :func:`rows_restore`. Two kernels: ascent (with the partial sums of ``r^2``), then
        projection; ``||r||`` stays on the device between them.
    """
    check_weight_and_grad(weight, grad)
    check_row_set(row_set, weight.shape[0], grad.shape[0])
    n, d = len(row_set), weight.shape[1]
    if backup is not None and tuple(backup.shape) != (n, d):
        raise ValueError(f"backup must be [{n}, {d}] (one row per slot), found {tuple(backup.shape)}.")
    backend = backend or resolve_backend(weight.device)
    if backend == "torch":
        return rows_pgd_step_reference(weight, grad, row_set, backup, norm, ok, alpha, epsilon)
    save_backup = backup is None
    if save_backup:  # zeroed, as in rows_backup_add: duplicate slots are not written
        backup = torch.zeros((n, d), dtype=weight.dtype, device=weight.device)
    if n == 0:
        return backup
    _rows_pgd_step(
        weight, grad, backup, row_set.rows, row_set.grad_rows, *first_flags(row_set), save_backup,
        *step_scalars(norm, ok), float(alpha), float(epsilon),
    )  # fmt: skip
    return backup


@torch.library.custom_op("fastadv::rows_pgd_step", mutates_args=("weight", "backup"))
def _rows_pgd_step(
    weight: torch.Tensor,
    grad: torch.Tensor,
    backup: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    first: torch.Tensor,
    has_first: bool,
    save_backup: bool,
    norm: torch.Tensor,
    ok: torch.Tensor,
    alpha: float,
    epsilon: float,
) -> None:
    """Ascent (filling ``backup`` first when ``save_backup``), then projection, on the slots' rows of ``weight``."""
    n, d = rows.numel(), weight.shape[1]
    options = row_launch_options(d)
    grid = (row_programs(n, d),)
    r = torch.empty((n, d), dtype=weight.dtype, device=weight.device)
    partial = torch.empty(grid[0], dtype=torch.float32, device=weight.device)
    kernels().rows_pgd_ascent_kernel[grid](
        weight, grad, backup, r, partial, rows, grad_rows, first, norm, ok, alpha,
        n, d, weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1),
        SAVE_BACKUP=save_backup, HAS_FIRST=has_first, **options,
    )  # fmt: skip
    r_norm = partial.sum().sqrt().reshape(1)
    kernels().rows_pgd_project_kernel[grid](
        weight, backup, r, rows, first, r_norm, ok, epsilon, n, d, weight.stride(0), weight.stride(1),
        HAS_FIRST=has_first, **options,
    )  # fmt: skip


@_rows_pgd_step.register_fake
def _(*args: object) -> None:
    return None

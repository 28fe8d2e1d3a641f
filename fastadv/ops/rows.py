"""Host launchers of the row kernels, each beside its torch reference (the CPU path and the oracle).

A :class:`RowSet` says which rows of a [V, D] weight an op touches. Three ops act on it:

- :func:`rows_l2_norm`: the L2 norm of the gradient over the distinct rows, accumulated in fp32;
- :func:`rows_backup_add`: save the rows, then add ``epsilon * g / norm`` (or ``epsilon * sign(g)``)
  in place, unless the device flag ``ok`` says to skip;
- :func:`rows_restore`: copy the saved rows back, bit for bit;
- :func:`rows_pgd_step`: one projected ascent step of PGD around the saved rows (saving them first
  on a round's first step).

:func:`gather_rows` re-addresses a gradient given on one row set to the slots of another.

None of them syncs with the host: shapes depend on the number of recorded ids only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .backend import Backend, kernels, resolve_backend

__all__ = [
    "DistinctSlots",
    "RowSet",
    "distinct_slots",
    "gather_rows",
    "row_block_sizes",
    "row_launch_options",
    "row_set_from_ids",
    "rows_backup_add",
    "rows_backup_add_reference",
    "rows_l2_norm",
    "rows_l2_norm_reference",
    "rows_pgd_step",
    "rows_pgd_step_reference",
    "rows_restore",
    "rows_restore_reference",
]


@dataclass(frozen=True)
class RowSet:
    """The rows an op touches, as N slots.

    Attributes:
        rows: int64 [N], the weight row of each slot.
        grad_rows: int64 [N], the row of the gradient matrix each slot reads: ``rows`` itself for a
            dense [V, D] gradient, positions in ``values`` for a sparse gradient.
        first: bool [N] or None. When given, several slots may name one row and only the flagged
            (first) slot of each row counts; None means the rows are distinct.
    """

    rows: torch.Tensor
    grad_rows: torch.Tensor
    first: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.rows.numel()

    def as_slots(self) -> RowSet:
        """The same slots, read from an [N, D] matrix that holds one row per slot."""
        return RowSet(self.rows, torch.arange(len(self), device=self.rows.device), self.first)


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
    if static_shape is None:
        static_shape = flat.is_cuda
    if not static_shape:
        rows = torch.unique(flat)
        return RowSet(rows, rows)
    slots = distinct_slots(torch.sort(flat).values, num_rows)
    return RowSet(slots.rows, slots.rows, slots.first)


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


def row_block_sizes(d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) for rows of length ``d``: tiles of about 2048 elements."""
    block_d = min(256, 1 << max(0, (d - 1).bit_length()))
    return max(1, 2048 // block_d), block_d


# 8 warps: 8 elements of each 2048-element tile per thread. With 4 warps the PGD ascent's live
# tiles spilled on sm_90 under Triton 3.9's ptxas (tests/test_kernel_compile.py). FMA fusion is
# stated rather than left to Triton's default, which 3.10 changes; it only fuses the sums of
# squares (a fused g * g + acc is the more accurate), every perturbation is a division then an add.
KERNEL_OPTIONS = {"num_warps": 8, "enable_fp_fusion": True}


def row_launch_options(d: int) -> dict[str, int | bool]:
    """The tile sizes and launch options of every row kernel for rows of length ``d``."""
    block_n, block_d = row_block_sizes(d)
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, **KERNEL_OPTIONS}


def _first_as_uint8(row_set: RowSet) -> torch.Tensor:
    if row_set.first is None:  # unread when HAS_FIRST=0; a uint8 view, so the kernel compiles one pointer type
        return row_set.rows.view(torch.uint8)
    return row_set.first.view(torch.uint8)


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a [rows, D] matrix, found shape {tuple(t.shape)}.")


# ---------------------------------------------------------------- sum of squares


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
    _check_2d("grad", grad)
    backend = backend or resolve_backend(grad.device)
    if backend == "torch" or len(row_set) == 0:
        return rows_l2_norm_reference(grad, row_set)
    partial = _rows_sum_of_squares(grad, row_set.grad_rows, _first_as_uint8(row_set), row_set.first is not None)
    return partial.sum().sqrt()


# The Triton launches are torch.library custom ops: torch.compile sees each as one opaque op (no
# graph break in the caller's graph), and its fake implementation gives the output's shape.


@torch.library.custom_op("fastadv::rows_sum_of_squares", mutates_args=())
def _rows_sum_of_squares(
    grad: torch.Tensor, grad_rows: torch.Tensor, first: torch.Tensor, has_first: bool
) -> torch.Tensor:
    """fp32 [programs]: one partial sum of squares of the slots' gradient rows per program."""
    n, d = grad_rows.numel(), grad.shape[1]
    options = row_launch_options(d)
    partial = torch.empty(_cdiv(n, options["BLOCK_N"]), dtype=torch.float32, device=grad.device)
    kernels().rows_sum_of_squares_kernel[(partial.numel(),)](
        grad, grad_rows, first, partial, n, d, grad.stride(0), grad.stride(1), HAS_FIRST=has_first, **options,
    )  # fmt: skip
    return partial


@_rows_sum_of_squares.register_fake
def _(grad: torch.Tensor, grad_rows: torch.Tensor, first: torch.Tensor, has_first: bool) -> torch.Tensor:
    block_n, _ = row_block_sizes(grad.shape[1])
    return grad.new_empty(_cdiv(grad_rows.numel(), block_n), dtype=torch.float32)


# ---------------------------------------------------------------- backup + scaled add


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
    torch.where(ok, work, backup, out=work)  # a skipped step writes the saved rows back, bit for bit
    # Duplicate slots hold identical values, so copying them all writes each row once in effect.
    weight.index_copy_(0, row_set.rows, work.to(weight.dtype))
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
    _check_2d("weight", weight)
    _check_2d("grad", grad)
    if grad.shape[1] != weight.shape[1]:
        raise ValueError(f"grad rows have {grad.shape[1]} columns, weight rows have {weight.shape[1]}.")
    backend = backend or resolve_backend(weight.device)
    if backend == "torch":
        return rows_backup_add_reference(weight, grad, row_set, norm, ok, epsilon, sign)
    if len(row_set) == 0:
        return weight.new_empty((0, weight.shape[1]))
    return _rows_backup_add(
        weight, grad, row_set.rows, row_set.grad_rows, _first_as_uint8(row_set), row_set.first is not None,
        norm.reshape(1).to(torch.float32), ok.reshape(1).to(torch.uint8), float(epsilon), sign,
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
    options = row_launch_options(d)
    kernels().rows_backup_add_kernel[(_cdiv(n, options["BLOCK_N"]),)](
        weight, grad, backup, rows, grad_rows, first, norm, ok, epsilon,
        n, d, weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1),
        SIGN=sign, HAS_FIRST=has_first, **options,
    )  # fmt: skip
    return backup


@_rows_backup_add.register_fake
def _(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, *args: object) -> torch.Tensor:
    return weight.new_empty((rows.numel(), weight.shape[1]))


# ---------------------------------------------------------------- restore


def rows_restore_reference(weight: torch.Tensor, backup: torch.Tensor, row_set: RowSet) -> None:
    """Torch reference of :func:`rows_restore`."""
    weight.index_copy_(0, row_set.rows, backup)


def rows_restore(weight: torch.Tensor, backup: torch.Tensor, row_set: RowSet, backend: Backend | None = None) -> None:
    """Copy ``backup`` ([N, D], from :func:`rows_backup_add` on the same row set) back into ``weight``."""
    _check_2d("weight", weight)
    backend = backend or resolve_backend(weight.device)
    if backend == "torch":
        rows_restore_reference(weight, backup, row_set)
        return
    if len(row_set) == 0:
        return
    _rows_restore(weight, backup, row_set.rows, _first_as_uint8(row_set), row_set.first is not None)


@torch.library.custom_op("fastadv::rows_restore", mutates_args=("weight",))
def _rows_restore(
    weight: torch.Tensor, backup: torch.Tensor, rows: torch.Tensor, first: torch.Tensor, has_first: bool
) -> None:
    """Copies ``backup`` ([N, D]) into the slots' rows of ``weight``."""
    n, d = rows.numel(), weight.shape[1]
    options = row_launch_options(d)
    kernels().rows_restore_kernel[(_cdiv(n, options["BLOCK_N"]),)](
        weight, backup, rows, first, n, d, weight.stride(0), weight.stride(1), HAS_FIRST=has_first, **options,
    )  # fmt: skip


@_rows_restore.register_fake
def _(*args: object) -> None:
    return None


# ---------------------------------------------------------------- PGD: ascent + projection


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
    _check_2d("weight", weight)
    _check_2d("grad", grad)
    if grad.shape[1] != weight.shape[1]:
        raise ValueError(f"grad rows have {grad.shape[1]} columns, weight rows have {weight.shape[1]}.")
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
        weight, grad, backup, row_set.rows, row_set.grad_rows, _first_as_uint8(row_set), row_set.first is not None,
        save_backup, norm.reshape(1).to(torch.float32), ok.reshape(1).to(torch.uint8), float(alpha), float(epsilon),
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
    grid = (_cdiv(n, options["BLOCK_N"]),)
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


# ---------------------------------------------------------------- re-addressing gradient rows


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

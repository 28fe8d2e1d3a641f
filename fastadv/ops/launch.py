"""What every host launcher of a row kernel shares: tile sizes, launch options and grids, the
arguments as the kernels read them, and the checks.

The Triton launches are torch.library custom ops: torch.compile sees each as one opaque op (no
graph break in the caller's graph), and its fake implementation gives the output's shape.
"""

from __future__ import annotations

import torch

from .row_set import RowSet


def row_block_sizes(d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) for rows of length ``d``: tiles of about 2048 elements."""
    block_d = min(256, 1 << max(0, (d - 1).bit_length()))
    return max(1, 2048 // block_d), block_d


# 8 warps: 8 elements of each 2048-element tile per thread. With 4 warps the PGD ascent's live
# tiles spilled on sm_90 under Triton 3.9's ptxas (tests/ops/test_kernel_compile.py). FMA fusion is
# stated rather than left to Triton's default, which 3.10 changes; it only fuses the sums of
# squares (a fused g * g + acc is the more accurate), every perturbation is a division then an add.
KERNEL_OPTIONS = {"num_warps": 8, "enable_fp_fusion": True}


def row_launch_options(d: int) -> dict[str, int | bool]:
    """The tile sizes and launch options of every row kernel for rows of length ``d``."""
    block_n, block_d = row_block_sizes(d)
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, **KERNEL_OPTIONS}


def row_programs(n: int, d: int) -> int:
    """How many programs a row kernel runs over ``n`` slots of rows of length ``d`` (BLOCK_N slots each)."""
    return cdiv(n, row_block_sizes(d)[0])


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def first_flags(row_set: RowSet) -> tuple[torch.Tensor, bool]:
    """(first, has_first), the first-occurrence flags as the kernels take them: uint8 [N], and whether to read them."""
    if row_set.first is None:  # unread when HAS_FIRST=0; a uint8 view, so the kernel compiles one pointer type
        return row_set.rows.view(torch.uint8), False
    return row_set.first.view(torch.uint8), True


def step_scalars(norm: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm, ok) as the kernels read them: fp32 [1] and uint8 [1], from 0-dim or [1] tensors."""
    return norm.reshape(1).to(torch.float32), ok.reshape(1).to(torch.uint8)


def check_matrix(name: str, t: torch.Tensor) -> None:
    """Refuse anything but a [rows, D] matrix."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be a [rows, D] matrix, found shape {tuple(t.shape)}.")


def check_weight_and_grad(weight: torch.Tensor, grad: torch.Tensor) -> None:
    """Refuse a weight or gradient that is not a matrix, or whose rows differ in length."""
    check_matrix("weight", weight)
    check_matrix("grad", grad)
    if grad.shape[1] != weight.shape[1]:
        raise ValueError(f"grad rows have {grad.shape[1]} columns, weight rows have {weight.shape[1]}.")

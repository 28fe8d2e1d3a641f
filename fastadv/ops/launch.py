"""What every host launcher of a row kernel shares: tile sizes and launch options, and the checks.

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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

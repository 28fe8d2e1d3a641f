"""The kernel of fastadv.ops.rows_backup_add: save the slots' rows, then add the perturbation in place."""

import triton
import triton.language as tl

from .row_set import column_block, program_slot_rows, slot_major, slot_rows, strided_rows


@triton.jit
def rows_backup_add_kernel(
    w_ptr,  # weight, [V, D] with strides (stride_w_row, stride_w_col); perturbed in place
    g_ptr,  # gradient rows, [R, D] with strides (stride_g_row, stride_g_col)
    backup_ptr,  # [N, D] contiguous, weight dtype: receives the original rows of flagged slots
    w_rows_ptr,  # int64 [N]: the weight row of each slot
    g_rows_ptr,  # int64 [N]: the gradient row of each slot (== w_rows for a dense gradient)
    first_ptr,  # uint8 [N]: 1 on the first slot of each distinct row (HAS_FIRST only)
    norm_ptr,  # fp32 [1]: the L2 norm of the gradient over all its rows
    ok_ptr,  # uint8 [1]: 0 skips the step on the device (zero or non-finite norm)
    epsilon,  # fp32 scalar: the perturbation size
    N,  # number of slots
    D,  # row length: the columns of every [., D] buffer
    stride_w_row,  # elements between two weight rows (any layout, a transposed table too)
    stride_w_col,  # elements between two weight columns
    stride_g_row,  # elements between two gradient rows
    stride_g_col,  # elements between two gradient columns
    SIGN: tl.constexpr,  # True: epsilon * sign(g) (FGSM); False: epsilon * g / norm (FGM)
    HAS_FIRST: tl.constexpr,  # True: only flagged slots work (static shapes); False: all are distinct
    BLOCK_N: tl.constexpr,  # slots per program (fastadv.ops.launch.row_launch_options)
    BLOCK_D: tl.constexpr,  # columns per iteration, a power of two
):
    o_n, m_n, b_w_row = program_slot_rows(w_rows_ptr, first_ptr, N, HAS_FIRST, BLOCK_N)
    b_g_row = slot_rows(g_rows_ptr, o_n, m_n)
    b_ok = tl.load(ok_ptr) != 0
    b_norm = tl.where(b_ok, tl.load(norm_ptr), 1.0)  # a skipped step never divides by 0 or Inf
    for d0 in range(0, D, BLOCK_D):
        o_d64, m = column_block(d0, D, m_n, BLOCK_D)
        p_w = strided_rows(w_ptr, b_w_row, stride_w_row, stride_w_col, o_d64)
        b_w = tl.load(p_w, mask=m, other=0.0)
        tl.store(slot_major(backup_ptr, o_n, D, o_d64), b_w, mask=m)
        b_g = tl.load(strided_rows(g_ptr, b_g_row, stride_g_row, stride_g_col, o_d64), mask=m, other=0.0)
        b_g = b_g.to(tl.float32)
        if SIGN:
            b_delta = epsilon * tl.where(b_g > 0, 1.0, tl.where(b_g < 0, -1.0, 0.0))
        else:
            # Same order of operations as the snippet's `epsilon * grad / norm`.
            b_delta = (epsilon * b_g) / b_norm
        # A skipped step writes the row back untouched, bit for bit.
        b_new = tl.where(b_ok, (b_w.to(tl.float32) + b_delta).to(b_w.dtype), b_w)
        tl.store(p_w, b_new, mask=m)

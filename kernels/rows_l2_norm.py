"""The kernel of fastadv.ops.rows_l2_norm: partial sums of squares of the slots' gradient rows."""

import triton
import triton.language as tl

from .row_set import column_block, program_slot_rows, strided_rows


@triton.jit
def rows_sum_of_squares_kernel(
    g_ptr,  # gradient rows, [R, D] with strides (stride_g_row, stride_g_col); any float dtype
    g_rows_ptr,  # int64 [N]: the row of g that each slot reads
    first_ptr,  # uint8 [N]: 1 where the slot is the first occurrence of its row (HAS_FIRST only)
    partial_ptr,  # fp32 [cdiv(N, BLOCK_N)]: one partial sum of squares per program
    N,  # number of slots
    D,  # row length
    stride_g_row,  # elements between two gradient rows
    stride_g_col,  # elements between two gradient columns
    HAS_FIRST: tl.constexpr,  # False when every slot is a distinct row (no flags to read)
    BLOCK_N: tl.constexpr,  # slots per program (fastadv.ops.launch.row_launch_options)
    BLOCK_D: tl.constexpr,  # columns per iteration, a power of two
):
    _, m_n, b_row = program_slot_rows(g_rows_ptr, first_ptr, N, HAS_FIRST, BLOCK_N)
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d64, m = column_block(d0, D, m_n, BLOCK_D)
        p_g = strided_rows(g_ptr, b_row, stride_g_row, stride_g_col, o_d64)
        b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
        b_acc += b_g * b_g
    tl.store(partial_ptr + tl.program_id(0), tl.sum(b_acc))

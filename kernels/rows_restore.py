"""The kernel of fastadv.ops.rows_restore: copy the saved rows back into the weight."""

import triton
import triton.language as tl

from .row_set import column_block, program_slot_rows, slot_major, strided_rows


@triton.jit
def rows_restore_kernel(
    w_ptr,  # weight, [V, D] with strides (stride_w_row, stride_w_col); restored in place
    backup_ptr,  # [N, D] contiguous: the rows saved by rows_backup_add_kernel
    w_rows_ptr,  # int64 [N]: the weight row of each slot
    first_ptr,  # uint8 [N]: 1 on the first slot of each distinct row (HAS_FIRST only)
    N,  # number of slots
    D,  # row length: the columns of every [., D] buffer
    stride_w_row,  # elements between two weight rows (any layout, a transposed table too)
    stride_w_col,  # elements between two weight columns
    HAS_FIRST: tl.constexpr,  # True: only flagged slots work (static shapes); False: all are distinct
    BLOCK_N: tl.constexpr,  # slots per program (fastadv.ops.launch.row_launch_options)
    BLOCK_D: tl.constexpr,  # columns per iteration, a power of two
):
    o_n, m_n, b_w_row = program_slot_rows(w_rows_ptr, first_ptr, N, HAS_FIRST, BLOCK_N)
    for d0 in range(0, D, BLOCK_D):
        o_d64, m = column_block(d0, D, m_n, BLOCK_D)
        b_backup = tl.load(slot_major(backup_ptr, o_n, D, o_d64), mask=m, other=0.0)
        tl.store(strided_rows(w_ptr, b_w_row, stride_w_row, stride_w_col, o_d64), b_backup, mask=m)

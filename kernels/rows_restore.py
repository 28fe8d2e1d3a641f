"""The kernel of fastadv.ops.rows_restore: copy the saved rows back into the weight."""

import triton
import triton.language as tl


@triton.jit
def rows_restore_kernel(
    w_ptr,  # weight, [V, D] with strides (stride_w_row, stride_w_col); restored in place
    backup_ptr,  # [N, D] contiguous: the rows saved by rows_backup_add_kernel
    w_rows_ptr,  # int64 [N]: the weight row of each slot
    first_ptr,  # uint8 [N]: 1 on the first slot of each distinct row (HAS_FIRST only)
    N,
    D,
    stride_w_row,
    stride_w_col,
    HAS_FIRST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if HAS_FIRST:
        m_n = m_n & (tl.load(first_ptr + o_n, mask=m_n, other=0) != 0)
    b_w_row = tl.load(w_rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        o_d64 = o_d[None, :].to(tl.int64)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_backup = tl.load(backup_ptr + o_n[:, None].to(tl.int64) * D + o_d64, mask=m, other=0.0)
        tl.store(w_ptr + b_w_row[:, None] * stride_w_row + o_d64 * stride_w_col, b_backup, mask=m)

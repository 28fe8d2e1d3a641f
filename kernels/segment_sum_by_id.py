"""The kernel of fastadv.ops.segment_sum_by_id: sum the rows of the positions that share a token id."""

import triton
import triton.language as tl

from .row_set import strided_rows


@triton.jit
def segment_sum_kernel(
    values_ptr,  # [N, D] with strides (stride_v_row, stride_v_col): one row per token position
    order_ptr,  # int64 [N]: positions sorted by token id (the values row of each sorted position)
    start_ptr,  # int64 [M]: where slot k's run of equal ids starts in sorted order
    end_ptr,  # int64 [M]: one past its end (== start for a slot with no id: its sum is 0)
    out_ptr,  # fp32 [M, D] contiguous: row k receives the sum of its run's rows of values
    D,  # row length: the columns of every [., D] buffer
    stride_v_row,  # elements between two rows of values
    stride_v_col,  # elements between two columns of values
    BLOCK_N: tl.constexpr,  # sorted positions read per iteration
    BLOCK_D: tl.constexpr,  # columns per iteration, a power of two
):
    # One program per (slot, column block), a deterministic sum with no atomics. A run is read
    # BLOCK_N rows at a time, so a long one (the padding id can hold half of all positions) keeps
    # many loads in flight instead of one row per iteration.
    i_k, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_d64 = o_d.to(tl.int64)
    b_start = tl.load(start_ptr + i_k)
    b_end = tl.load(end_ptr + i_k)
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j0 in range(b_start, b_end, BLOCK_N):
        o_j = j0 + tl.arange(0, BLOCK_N)
        m_j = o_j < b_end
        b_pos = tl.load(order_ptr + o_j, mask=m_j, other=0).to(tl.int64)
        p_v = strided_rows(values_ptr, b_pos, stride_v_row, stride_v_col, o_d64[None, :])
        b_acc += tl.load(p_v, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + i_k.to(tl.int64) * D + o_d64, tl.sum(b_acc, axis=0), mask=m_d)

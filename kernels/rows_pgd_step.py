"""The kernels of fastadv.ops.rows_pgd_step: the ascent (with the partial sums of r^2), then the projection."""

import triton
import triton.language as tl

from .row_set import column_block, program_slot_rows, slot_major, slot_rows, strided_rows, working_slots


@triton.jit
def rows_pgd_ascent_kernel(
    w_ptr,  # weight, [V, D] with strides (stride_w_row, stride_w_col); read only here
    g_ptr,  # gradient rows, [R, D] with strides (stride_g_row, stride_g_col)
    backup_ptr,  # [N, D] contiguous, weight dtype: the clean rows (written when SAVE_BACKUP, else read)
    r_ptr,  # [N, D] contiguous, weight dtype: receives the displacement r = (w + step) - backup
    partial_ptr,  # fp32 [cdiv(N, BLOCK_N)]: one partial sum of r^2 per program (for ||r||)
    w_rows_ptr,  # int64 [N]: the weight row of each slot
    g_rows_ptr,  # int64 [N]: the gradient row of each slot
    first_ptr,  # uint8 [N]: 1 on the first slot of each distinct row (HAS_FIRST only)
    norm_ptr,  # fp32 [1]: ||g|| over all rows
    ok_ptr,  # uint8 [1]: 0 skips the step on the device (r = 0, nothing added)
    alpha,  # fp32 scalar: the ascent step size
    N,  # number of slots
    D,  # row length: the columns of every [., D] buffer
    stride_w_row,  # elements between two weight rows (any layout, a transposed table too)
    stride_w_col,  # elements between two weight columns
    stride_g_row,  # elements between two gradient rows
    stride_g_col,  # elements between two gradient columns
    SAVE_BACKUP: tl.constexpr,  # True on the first attack of a PGD round
    HAS_FIRST: tl.constexpr,  # True: only flagged slots work (static shapes); False: all are distinct
    BLOCK_N: tl.constexpr,  # slots per program (fastadv.ops.launch.row_launch_options)
    BLOCK_D: tl.constexpr,  # columns per iteration, a power of two
):
    # First half of a PGD step: r = (w + alpha * g / ||g||) - backup, rounded to the weight dtype
    # at each operation as the snippet's in-place add and subtraction are. The weight is written
    # by rows_pgd_project_kernel, once ||r|| is known.
    o_n, m_n, b_w_row = program_slot_rows(w_rows_ptr, first_ptr, N, HAS_FIRST, BLOCK_N)
    b_g_row = slot_rows(g_rows_ptr, o_n, m_n)
    b_ok = tl.load(ok_ptr) != 0
    b_norm = tl.where(b_ok, tl.load(norm_ptr), 1.0)
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d64, m = column_block(d0, D, m_n, BLOCK_D)
        b_w = tl.load(strided_rows(w_ptr, b_w_row, stride_w_row, stride_w_col, o_d64), mask=m, other=0.0)
        p_backup = slot_major(backup_ptr, o_n, D, o_d64)
        if SAVE_BACKUP:
            tl.store(p_backup, b_w, mask=m)
            b_backup = b_w
        else:
            b_backup = tl.load(p_backup, mask=m, other=0.0)
        b_g = tl.load(strided_rows(g_ptr, b_g_row, stride_g_row, stride_g_col, o_d64), mask=m, other=0.0)
        b_new = (b_w.to(tl.float32) + (alpha * b_g.to(tl.float32)) / b_norm).to(b_w.dtype)
        b_r = (b_new.to(tl.float32) - b_backup.to(tl.float32)).to(b_w.dtype)
        b_r = tl.where(b_ok, b_r, 0.0).to(b_w.dtype)
        tl.store(slot_major(r_ptr, o_n, D, o_d64), b_r, mask=m)
        b_r32 = b_r.to(tl.float32)
        b_acc += b_r32 * b_r32
    tl.store(partial_ptr + tl.program_id(0), tl.sum(b_acc))


@triton.jit
def rows_pgd_project_kernel(
    w_ptr,  # weight, [V, D] with strides (stride_w_row, stride_w_col); written in place
    backup_ptr,  # [N, D] contiguous: the clean rows
    r_ptr,  # [N, D] contiguous: the displacement from rows_pgd_ascent_kernel
    w_rows_ptr,  # int64 [N]
    first_ptr,  # uint8 [N] (HAS_FIRST only)
    r_norm_ptr,  # fp32 [1]: ||r|| over all rows
    ok_ptr,  # uint8 [1]: 0 leaves the weight as it is
    epsilon,  # fp32 scalar: the radius of the ball around the clean rows
    N,  # number of slots
    D,  # row length: the columns of every [., D] buffer
    stride_w_row,  # elements between two weight rows (any layout, a transposed table too)
    stride_w_col,  # elements between two weight columns
    HAS_FIRST: tl.constexpr,  # True: only flagged slots work (static shapes); False: all are distinct
    BLOCK_N: tl.constexpr,  # slots per program (fastadv.ops.launch.row_launch_options)
    BLOCK_D: tl.constexpr,  # columns per iteration, a power of two
):
    # Second half: w = backup + r, with r scaled to epsilon * r / ||r|| when ||r|| > epsilon.
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # A skipped step reads and writes nothing: the rows stay as they are. (The flag is read once per
    # slot, so the mask is a vector: Triton's interpreter rejects a vector & scalar mask.)
    m_n = working_slots(first_ptr, o_n, (o_n < N) & (tl.load(ok_ptr + o_n * 0) != 0), HAS_FIRST)
    b_w_row = slot_rows(w_rows_ptr, o_n, m_n)
    b_r_norm = tl.load(r_norm_ptr)
    b_outside = b_r_norm > epsilon
    b_divisor = tl.where(b_outside, b_r_norm, 1.0)
    for d0 in range(0, D, BLOCK_D):
        o_d64, m = column_block(d0, D, m_n, BLOCK_D)
        # One slot-major offset for both buffers: two slot_major calls compile to more registers.
        o_slot = o_n[:, None].to(tl.int64) * D + o_d64
        b_backup = tl.load(backup_ptr + o_slot, mask=m, other=0.0)
        b_r = tl.load(r_ptr + o_slot, mask=m, other=0.0)
        # Same order as the snippet's `epsilon * r / torch.norm(r)`, rounded to the weight dtype.
        b_scaled = tl.where(b_outside, ((epsilon * b_r.to(tl.float32)) / b_divisor).to(b_r.dtype), b_r)
        b_new = (b_backup.to(tl.float32) + b_scaled.to(tl.float32)).to(b_backup.dtype)
        tl.store(strided_rows(w_ptr, b_w_row, stride_w_row, stride_w_col, o_d64), b_new, mask=m)

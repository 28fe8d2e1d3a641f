"""Row kernels for perturbing the touched rows of an embedding table.

Vocabulary: a *slot* is one entry of the row list handed to a kernel (N slots in all). On CUDA the
list is the sorted token ids of the batch, duplicates included, with a flag on the first slot of
each distinct row, so its length is static (no host sync to count unique ids). Only flagged slots
do work: a duplicate slot would otherwise read a row its twin has already perturbed.

Each program handles BLOCK_N slots and walks the row in BLOCK_D chunks. Row offsets are int64
(V * d overflows int32 for large vocabularies); arithmetic is fp32 whatever the storage dtype.
These kernels know nothing of modules or autograd: see fastadv/ops/rows.py for the launchers and
the torch reference of each kernel.
"""

import triton
import triton.language as tl


@triton.jit
def rows_sum_of_squares_kernel(
    g_ptr,  # gradient rows, [R, D] with strides (stride_g_row, stride_g_col); any float dtype
    g_rows_ptr,  # int64 [N]: the row of g that each slot reads
    first_ptr,  # uint8 [N]: 1 where the slot is the first occurrence of its row (HAS_FIRST only)
    partial_ptr,  # fp32 [cdiv(N, BLOCK_N)]: one partial sum of squares per program
    N,  # number of slots
    D,  # row length
    stride_g_row,
    stride_g_col,
    HAS_FIRST: tl.constexpr,  # False when every slot is a distinct row (no flags to read)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if HAS_FIRST:
        m_n = m_n & (tl.load(first_ptr + o_n, mask=m_n, other=0) != 0)
    b_row = tl.load(g_rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_n[:, None] & (o_d < D)[None, :]
        p_g = g_ptr + b_row[:, None] * stride_g_row + o_d[None, :].to(tl.int64) * stride_g_col
        b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
        b_acc += b_g * b_g
    tl.store(partial_ptr + i_n, tl.sum(b_acc))


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
    N,
    D,
    stride_w_row,
    stride_w_col,
    stride_g_row,
    stride_g_col,
    SIGN: tl.constexpr,  # True: epsilon * sign(g) (FGSM); False: epsilon * g / norm (FGM)
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
    b_g_row = tl.load(g_rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    b_ok = tl.load(ok_ptr) != 0
    b_norm = tl.where(b_ok, tl.load(norm_ptr), 1.0)  # a skipped step never divides by 0 or Inf
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        o_d64 = o_d[None, :].to(tl.int64)
        m = m_n[:, None] & (o_d < D)[None, :]
        p_w = w_ptr + b_w_row[:, None] * stride_w_row + o_d64 * stride_w_col
        b_w = tl.load(p_w, mask=m, other=0.0)
        tl.store(backup_ptr + o_n[:, None].to(tl.int64) * D + o_d64, b_w, mask=m)
        b_g = tl.load(g_ptr + b_g_row[:, None] * stride_g_row + o_d64 * stride_g_col, mask=m, other=0.0)
        b_g = b_g.to(tl.float32)
        if SIGN:
            b_delta = epsilon * tl.where(b_g > 0, 1.0, tl.where(b_g < 0, -1.0, 0.0))
        else:
            # Same order of operations as the snippet's `epsilon * grad / norm`.
            b_delta = (epsilon * b_g) / b_norm
        # A skipped step writes the row back untouched, bit for bit.
        b_new = tl.where(b_ok, (b_w.to(tl.float32) + b_delta).to(b_w.dtype), b_w)
        tl.store(p_w, b_new, mask=m)


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


@triton.jit
def segment_sum_kernel(
    values_ptr,  # [N, D] with strides (stride_v_row, stride_v_col): one row per token position
    order_ptr,  # int64 [N]: positions sorted by token id (the values row of each sorted position)
    start_ptr,  # int64 [M]: where slot k's run of equal ids starts in sorted order
    end_ptr,  # int64 [M]: one past its end (== start for a slot with no id: its sum is 0)
    out_ptr,  # fp32 [M, D] contiguous: row k receives the sum of its run's rows of values
    D,
    stride_v_row,
    stride_v_col,
    BLOCK_N: tl.constexpr,  # sorted positions read per iteration
    BLOCK_D: tl.constexpr,
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
        p_v = values_ptr + b_pos[:, None] * stride_v_row + o_d64[None, :] * stride_v_col
        b_acc += tl.load(p_v, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + i_k.to(tl.int64) * D + o_d64, tl.sum(b_acc, axis=0), mask=m_d)


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
    N,
    D,
    stride_w_row,
    stride_w_col,
    stride_g_row,
    stride_g_col,
    SAVE_BACKUP: tl.constexpr,  # True on the first attack of a PGD round
    HAS_FIRST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # First half of a PGD step: r = (w + alpha * g / ||g||) - backup, rounded to the weight dtype
    # at each operation as the snippet's in-place add and subtraction are. The weight is written
    # by rows_pgd_project_kernel, once ||r|| is known.
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if HAS_FIRST:
        m_n = m_n & (tl.load(first_ptr + o_n, mask=m_n, other=0) != 0)
    b_w_row = tl.load(w_rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    b_g_row = tl.load(g_rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    b_ok = tl.load(ok_ptr) != 0
    b_norm = tl.where(b_ok, tl.load(norm_ptr), 1.0)
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        o_d64 = o_d[None, :].to(tl.int64)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_w = tl.load(w_ptr + b_w_row[:, None] * stride_w_row + o_d64 * stride_w_col, mask=m, other=0.0)
        p_backup = backup_ptr + o_n[:, None].to(tl.int64) * D + o_d64
        if SAVE_BACKUP:
            tl.store(p_backup, b_w, mask=m)
            b_backup = b_w
        else:
            b_backup = tl.load(p_backup, mask=m, other=0.0)
        b_g = tl.load(g_ptr + b_g_row[:, None] * stride_g_row + o_d64 * stride_g_col, mask=m, other=0.0)
        b_new = (b_w.to(tl.float32) + (alpha * b_g.to(tl.float32)) / b_norm).to(b_w.dtype)
        b_r = (b_new.to(tl.float32) - b_backup.to(tl.float32)).to(b_w.dtype)
        b_r = tl.where(b_ok, b_r, 0.0).to(b_w.dtype)
        tl.store(r_ptr + o_n[:, None].to(tl.int64) * D + o_d64, b_r, mask=m)
        b_r32 = b_r.to(tl.float32)
        b_acc += b_r32 * b_r32
    tl.store(partial_ptr + i_n, tl.sum(b_acc))


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
    N,
    D,
    stride_w_row,
    stride_w_col,
    HAS_FIRST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Second half: w = backup + r, with r scaled to epsilon * r / ||r|| when ||r|| > epsilon.
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # A skipped step reads and writes nothing: the rows stay as they are. (The flag is read once per
    # slot, so the mask is a vector: Triton's interpreter rejects a vector & scalar mask.)
    m_n = (o_n < N) & (tl.load(ok_ptr + o_n * 0) != 0)
    if HAS_FIRST:
        m_n = m_n & (tl.load(first_ptr + o_n, mask=m_n, other=0) != 0)
    b_w_row = tl.load(w_rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    b_r_norm = tl.load(r_norm_ptr)
    b_outside = b_r_norm > epsilon
    b_divisor = tl.where(b_outside, b_r_norm, 1.0)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        o_d64 = o_d[None, :].to(tl.int64)
        m = m_n[:, None] & (o_d < D)[None, :]
        o_slot = o_n[:, None].to(tl.int64) * D + o_d64
        b_backup = tl.load(backup_ptr + o_slot, mask=m, other=0.0)
        b_r = tl.load(r_ptr + o_slot, mask=m, other=0.0)
        # Same order as the snippet's `epsilon * r / torch.norm(r)`, rounded to the weight dtype.
        b_scaled = tl.where(b_outside, ((epsilon * b_r.to(tl.float32)) / b_divisor).to(b_r.dtype), b_r)
        b_new = (b_backup.to(tl.float32) + b_scaled.to(tl.float32)).to(b_backup.dtype)
        tl.store(w_ptr + b_w_row[:, None] * stride_w_row + o_d64 * stride_w_col, b_new, mask=m)

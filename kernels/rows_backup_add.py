"""The kernel of fastadv.ops.rows_backup_add: save the slots' rows, then add the perturbation in place."""

import triton
import triton.language as tl


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

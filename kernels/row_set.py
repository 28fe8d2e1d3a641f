"""The opening every row kernel shares, written once: which slots a program handles, which columns, and
where those rows lie in each buffer.

Inlined by Triton into each kernel (plain ``@triton.jit`` functions), so a kernel compiles to the
same code as with these lines written out in it. The kernel side of ``fastadv/ops/row_set.py``.
"""

import triton
import triton.language as tl


@triton.jit
def working_slots(first_ptr, o_n, m_n, HAS_FIRST: tl.constexpr):
    """``m_n`` narrowed, with HAS_FIRST, to the flagged slots (the first of each distinct row)."""
    if HAS_FIRST:
        m_n = m_n & (tl.load(first_ptr + o_n, mask=m_n, other=0) != 0)
    return m_n


@triton.jit
def program_slots(i_n, first_ptr, N, HAS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``i_n``'s BLOCK_N slots: (o_n, m_n), the slot offsets [BLOCK_N] and the mask of the
    slots that do work (in range and, with HAS_FIRST, flagged)."""
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return o_n, working_slots(first_ptr, o_n, o_n < N, HAS_FIRST)


@triton.jit
def slot_rows(rows_ptr, o_n, m_n):
    """The row each working slot names (int64 [BLOCK_N], 0 elsewhere), read from an int64 [N] list."""
    return tl.load(rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)


@triton.jit
def program_slot_rows(rows_ptr, first_ptr, N, HAS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (axis 0) slots and the row each names: (o_n, m_n, b_row), program_slots then slot_rows."""
    o_n, m_n = program_slots(tl.program_id(0), first_ptr, N, HAS_FIRST, BLOCK_N)
    return o_n, m_n, slot_rows(rows_ptr, o_n, m_n)


@triton.jit
def column_block(d0, D, m_n, BLOCK_D: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D): (o_d64, m), the int64 offsets [1, BLOCK_D] and the tile mask
    [BLOCK_N, BLOCK_D] of working slots and columns below D."""
    o_d = d0 + tl.arange(0, BLOCK_D)
    return o_d[None, :].to(tl.int64), m_n[:, None] & (o_d < D)[None, :]


@triton.jit
def slot_major(ptr, o_n, D, o_d64):
    """Pointers [BLOCK_N, BLOCK_D] into ``ptr``, a contiguous [N, D] buffer of one row per slot (backup, r)."""
    return ptr + o_n[:, None].to(tl.int64) * D + o_d64


@triton.jit
def strided_rows(ptr, b_row, stride_row, stride_col, o_d64):
    """Pointers [BLOCK_N, BLOCK_D] into ``ptr``, a table of any layout (weight [V, D], gradient [R, D]) with
    strides (stride_row, stride_col), at the int64 rows ``b_row`` [BLOCK_N]: slot_major's counterpart."""
    return ptr + b_row[:, None] * stride_row + o_d64 * stride_col

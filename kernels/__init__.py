"""Triton kernels of fastadv (installed as ``fastadv.kernels``). Only ``@triton.jit`` code lives here.

Importing this package decorates the kernels, and Triton decides at that moment whether they run
compiled (CUDA) or interpreted on CPU tensors (``TRITON_INTERPRET=1``). fastadv imports it lazily,
from ``fastadv.ops.backend``, the first time the Triton backend is chosen.
"""

from .rows import (
    rows_backup_add_kernel,
    rows_pgd_ascent_kernel,
    rows_pgd_project_kernel,
    rows_restore_kernel,
    rows_sum_of_squares_kernel,
    segment_sum_kernel,
)

__all__ = [
    "rows_backup_add_kernel",
    "rows_pgd_ascent_kernel",
    "rows_pgd_project_kernel",
    "rows_restore_kernel",
    "rows_sum_of_squares_kernel",
    "segment_sum_kernel",
]

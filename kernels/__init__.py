"""Triton kernels of fastadv (installed as ``fastadv.kernels``). Only ``@triton.jit`` code lives here.

One module per op, named as its host launcher in ``fastadv/ops/``, which also holds the torch
reference of each kernel. These kernels know nothing of modules or autograd.

Vocabulary: a *slot* is one entry of the row list handed to a kernel (N slots in all). On CUDA the
list is the sorted token ids of the batch, duplicates included, with a flag on the first slot of
each distinct row, so its length is static (no host sync to count unique ids). Only flagged slots
do work: a duplicate slot would otherwise read a row its twin has already perturbed.

Each program handles BLOCK_N slots and walks the row in BLOCK_D chunks. Row offsets are int64
(V * d overflows int32 for large vocabularies); arithmetic is fp32 whatever the storage dtype.

Importing this package decorates the kernels, and Triton decides at that moment whether they run
compiled (CUDA) or interpreted on CPU tensors (``TRITON_INTERPRET=1``). fastadv imports it lazily,
from ``fastadv.ops.backend``, the first time the Triton backend is chosen.
"""

if __name__ == "kernels":  # this folder reached as a top-level package, e.g. from a shell in the repository
    raise ImportError(
        "imported the source folder kernels/ of fastadv as the top-level package `kernels` (its folder is on "
        f"sys.path: {__file__}). It installs as fastadv.kernels and is not Hugging Face's `kernels` package, "
        "which transformers imports: run Python from another directory, or with `python -P` (3.11+)."
    )

from .rows_backup_add import rows_backup_add_kernel
from .rows_l2_norm import rows_sum_of_squares_kernel
from .rows_pgd_step import rows_pgd_ascent_kernel, rows_pgd_project_kernel
from .rows_restore import rows_restore_kernel
from .segment_sum_by_id import segment_sum_kernel

__all__ = [
    "rows_backup_add_kernel",
    "rows_pgd_ascent_kernel",
    "rows_pgd_project_kernel",
    "rows_restore_kernel",
    "rows_sum_of_squares_kernel",
    "segment_sum_kernel",
]

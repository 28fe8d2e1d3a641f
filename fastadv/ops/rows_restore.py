"""Copy the rows saved by :func:`fastadv.ops.rows_backup_add` (or :func:`fastadv.ops.rows_pgd_step`)
back into the weight, bit for bit.

Kernel: ``kernels/rows_restore.py``. No host sync.
"""

from __future__ import annotations

import torch

from .backend import Backend, kernels, resolve_backend
from .checks import check_row_set
from .launch import check_matrix, first_flags, row_launch_options, row_programs
from .row_set import RowSet


def rows_restore_reference(weight: torch.Tensor, backup: torch.Tensor, row_set: RowSet) -> None:
    """Torch reference of :func:`rows_restore`."""
    weight.index_copy_(0, row_set.rows, backup)


def rows_restore(weight: torch.Tensor, backup: torch.Tensor, row_set: RowSet, backend: Backend | None = None) -> None:
    """Copy ``backup`` ([N, D], from :func:`rows_backup_add` on the same row set) back into ``weight``."""
    check_matrix("weight", weight)
    check_row_set(row_set, weight.shape[0], None)
    if tuple(backup.shape) != (len(row_set), weight.shape[1]) or backup.dtype != weight.dtype:
        raise ValueError(
            f"backup must be the rows rows_backup_add saved: [{len(row_set)}, {weight.shape[1]}] {weight.dtype}, "
            f"found {list(backup.shape)} {backup.dtype}."
        )
    backend = backend or resolve_backend(weight.device)
    if backend == "torch":
        rows_restore_reference(weight, backup, row_set)
        return
    if len(row_set) == 0:
        return
    _rows_restore(weight, backup, row_set.rows, *first_flags(row_set))


@torch.library.custom_op("fastadv::rows_restore", mutates_args=("weight",))
def _rows_restore(
    weight: torch.Tensor, backup: torch.Tensor, rows: torch.Tensor, first: torch.Tensor, has_first: bool
) -> None:
    """Copies ``backup`` ([N, D]) into the slots' rows of ``weight``."""
    n, d = rows.numel(), weight.shape[1]
    kernels().rows_restore_kernel[(row_programs(n, d),)](
        weight, backup, rows, first, n, d, weight.stride(0), weight.stride(1),
        HAS_FIRST=has_first, **row_launch_options(d),
    )  # fmt: skip


@_rows_restore.register_fake
def _(*args: object) -> None:
    return None

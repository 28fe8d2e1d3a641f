"""Host launchers of the kernels, the torch reference beside each, the backend switch, and the row-gradient lookup."""

from .backend import Backend, resolve_backend
from .lookup import compact_ids, row_gradient_lookup
from .rows import (
    RowSet,
    gather_rows,
    row_block_sizes,
    row_set_from_ids,
    rows_backup_add,
    rows_backup_add_reference,
    rows_l2_norm,
    rows_l2_norm_reference,
    rows_pgd_step,
    rows_pgd_step_reference,
    rows_restore,
    rows_restore_reference,
)
from .segments import segment_sum_by_id, segment_sum_by_id_reference

__all__ = [
    "Backend",
    "RowSet",
    "compact_ids",
    "gather_rows",
    "resolve_backend",
    "row_block_sizes",
    "row_gradient_lookup",
    "row_set_from_ids",
    "rows_backup_add",
    "rows_backup_add_reference",
    "rows_l2_norm",
    "rows_l2_norm_reference",
    "rows_pgd_step",
    "rows_pgd_step_reference",
    "rows_restore",
    "rows_restore_reference",
    "segment_sum_by_id",
    "segment_sum_by_id_reference",
]

"""Host launchers of the kernels, the torch reference beside each, the backend switch, and the row-gradient lookup.

One op per module, named for its launcher; its kernel, if it has one, is in the module of the same
name under ``kernels/``, its tests in ``tests/ops/test_<op>.py``:

- :func:`rows_l2_norm`: the L2 norm of the gradient over the distinct rows, accumulated in fp32;
- :func:`rows_backup_add`: save the rows, then add ``epsilon * g / norm`` (or ``epsilon * sign(g)``)
  in place, unless the device flag ``ok`` says to skip;
- :func:`rows_restore`: copy the saved rows back, bit for bit;
- :func:`rows_pgd_step`: one projected ascent step of PGD around the saved rows (saving them first
  on a round's first step);
- :func:`segment_sum_by_id`: one gradient row per distinct id, from one row per token position;
- :func:`gather_rows`: re-address a gradient given on one row set to the slots of another (torch only);
- :func:`row_gradient_lookup` (``lookup.py``): an embedding lookup whose weight gradient comes as the
  batch's rows.

Shared by them: :class:`RowSet` and its construction (``row_set.py``), the launch settings and
checks (``launch.py``), the backend switch (``backend.py``). None of the row ops syncs with the
host: shapes depend on the number of recorded ids only.
"""

from .backend import Backend, resolve_backend
from .gather_rows import gather_rows
from .launch import row_block_sizes
from .lookup import compact_ids, row_gradient_lookup
from .row_set import RowSet, row_set_from_ids
from .rows_backup_add import rows_backup_add, rows_backup_add_reference
from .rows_l2_norm import rows_l2_norm, rows_l2_norm_reference
from .rows_pgd_step import rows_pgd_step, rows_pgd_step_reference
from .rows_restore import rows_restore, rows_restore_reference
from .segment_sum_by_id import segment_sum_by_id, segment_sum_by_id_reference

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

"""Row sets from token ids, and every row op on an empty row set."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from row_cases import make_case

from fastadv.ops import row_set_from_ids, rows_backup_add, rows_l2_norm, rows_restore


@pytest.mark.parametrize("static", [False, True], ids=["compact", "static"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_row_set_names_each_distinct_row_once(static, ids_dtype):
    ids = torch.tensor([[5, 3, 5, 0], [3, 3, 9, 0]], dtype=ids_dtype, device=DEVICE)
    rs = row_set_from_ids(ids, 10, static_shape=static)
    assert rs.rows.dtype == torch.int64
    counted = rs.rows if rs.first is None else rs.rows[rs.first]
    assert sorted(counted.tolist()) == [0, 3, 5, 9]
    assert len(rs) == (8 if static else 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_row_set(backend):
    weight0, grad, _ = make_case(10, 6, (1,), 10, torch.float32)
    rs = row_set_from_ids(torch.empty(0, dtype=torch.int64, device=DEVICE), 10, static_shape=True)
    assert rows_l2_norm(grad, rs, backend).item() == 0.0
    weight = weight0.clone()
    backup = rows_backup_add(weight, grad, rs, torch.tensor(1.0), torch.tensor(True), 1.0, False, backend)
    rows_restore(weight, backup, rs, backend)
    assert torch.equal(weight, weight0)

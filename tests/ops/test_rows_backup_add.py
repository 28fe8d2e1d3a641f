"""Backup + scaled add on a row set (then restore), through the torch reference and the Triton kernel,
against a plain dense oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_verbose, backend_dtype_cases
from row_cases import SHAPES, TOL, make_case, oracle_norm, oracle_perturbed, row_sets

from fastadv.ops import RowSet, row_set_from_ids, rows_backup_add, rows_l2_norm, rows_restore


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
@pytest.mark.parametrize("V,D,ids_shape,id_range", SHAPES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("sign", [False, True], ids=["l2", "sign"])
def test_backup_add_then_restore(backend, dtype, V, D, ids_shape, id_range, ids_dtype, sign):
    weight0, grad, ids = make_case(V, D, ids_shape, id_range, dtype, ids_dtype)
    norm = oracle_norm(grad, ids).float()
    want = oracle_perturbed(weight0, grad, ids, 0.7, norm, sign)
    untouched = torch.ones(V, dtype=torch.bool, device=DEVICE)
    untouched[ids.long().reshape(-1)] = False
    rtol, atol = TOL[dtype]
    ok = torch.tensor(True, device=DEVICE)
    for kind, rs in row_sets(ids, V).items():
        weight = weight0.clone()
        backup = rows_backup_add(weight, grad, rs, norm, ok, 0.7, sign, backend)
        assert_close_verbose(weight, want, rtol, atol, what=f"perturbed weight ({kind} rows, sign={sign})")
        assert torch.equal(weight[untouched], weight0[untouched]), "rows outside the batch changed"
        saved = backup if rs.first is None else backup[rs.first]
        assert torch.equal(saved, weight0[rs.rows if rs.first is None else rs.rows[rs.first]])
        rows_restore(weight, backup, rs, backend)
        assert torch.equal(weight, weight0), f"restore is not bitwise ({kind} rows)"


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
def test_skip_flag_leaves_weight_bitwise_untouched(backend, dtype):
    weight0, grad, ids = make_case(60, 37, (3, 11), 60, dtype)
    grad[ids[0, 0]] = float("nan")
    weight = weight0.clone()
    rs = row_set_from_ids(ids, 60)
    norm = rows_l2_norm(grad, rs, backend)
    assert not torch.isfinite(norm)
    backup = rows_backup_add(weight, grad, rs, norm, torch.isfinite(norm), 1.0, False, backend)
    assert torch.equal(weight, weight0)
    rows_restore(weight, backup, rs, backend)
    assert torch.equal(weight, weight0)


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
def test_gradient_given_as_sparse_values(backend, dtype):
    """A sparse gradient's values matrix, addressed through grad_rows, gives the dense result."""
    weight0, grad, ids = make_case(70, 45, (2, 9), 70, dtype)
    rows = torch.unique(ids.long())
    values = grad[rows].flip(0)  # rows of the values matrix in another order than the weight's
    rs = RowSet(rows.flip(0), torch.arange(rows.numel(), device=DEVICE))
    norm = oracle_norm(grad, ids).float()
    assert_close_verbose(rows_l2_norm(values, rs, backend), norm, 1e-6, 0, "L2 norm")
    weight = weight0.clone()
    backup = rows_backup_add(weight, values, rs, norm, torch.tensor(True, device=DEVICE), 1.0, False, backend)
    rtol, atol = TOL[dtype]
    assert_close_verbose(weight, oracle_perturbed(weight0, grad, ids, 1.0, norm, False), rtol, atol, "weight")
    rows_restore(weight, backup, rs, backend)
    assert torch.equal(weight, weight0)


def test_mismatched_shapes_are_refused():
    weight, grad, ids = make_case(10, 6, (3,), 10, torch.float32)
    rs = row_set_from_ids(ids, 10)
    with pytest.raises(ValueError, match="columns"):
        rows_backup_add(weight, grad[:, :5], rs, torch.tensor(1.0), torch.tensor(True), 1.0)
    with pytest.raises(ValueError, match=r"\[rows, D\] matrix, found shape \(10, 6, 1\)"):
        rows_l2_norm(grad.unsqueeze(-1), rs)

"""rows_restore: the saved rows written back bit for bit, through the torch reference and the Triton kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_dtype_cases
from row_cases import SHAPES, make_case, row_sets

from fastadv.ops import row_set_from_ids, rows_restore


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
@pytest.mark.parametrize("V,D,ids_shape,id_range", SHAPES)
@pytest.mark.parametrize("layout", ["rowmajor", "transposed"])
def test_restore_writes_the_saved_rows_and_nothing_else(backend, dtype, V, D, ids_shape, id_range, layout):
    weight0, _, ids = make_case(V, D, ids_shape, id_range, dtype, transposed=layout == "transposed")
    for kind, rs in row_sets(ids, V).items():
        saved = (weight0[rs.rows].float() + 1).to(dtype)  # [N, D], one row per slot (repeats identical)
        weight = weight0.clone()
        rows_restore(weight, saved, rs, backend)
        want = weight0.clone()
        want[rs.rows] = saved
        assert torch.equal(weight, want), f"restore wrote other values or other rows ({kind} rows)"


def test_a_weight_that_is_not_a_matrix_is_refused():
    weight, _, ids = make_case(10, 6, (3,), 10, torch.float32)
    rs = row_set_from_ids(ids, 10)
    with pytest.raises(ValueError, match=r"weight must be a \[rows, D\] matrix, found shape \(10, 6, 1\)"):
        rows_restore(weight.unsqueeze(-1), weight[:3], rs)

"""Segment sums by token id, torch reference and Triton kernel, against a dense scatter oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_verbose, backend_dtype_cases

from fastadv.ops import rows_l2_norm, segment_sum_by_id


def dense_oracle(values: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The lookup's weight gradient: a V x D scatter-add, in fp64."""
    return torch.zeros(vocab, values.shape[1], dtype=torch.float64, device=values.device).index_add_(
        0, ids.reshape(-1).long(), values.double()
    )


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
@pytest.mark.parametrize(
    "vocab,d,shape",
    [
        pytest.param(50, 60, (3, 13), id="V50-D60-B3-T13"),
        pytest.param(7, 123, (4, 25), id="V7-D123-many-repeats"),
        pytest.param(300, 1, (9,), id="V300-D1-N9"),
        pytest.param(1000, 257, (2, 31), id="V1000-D257-B2-T31"),
    ],
)
@pytest.mark.parametrize("static", [False, True], ids=["compact", "static"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_segment_sums_equal_the_lookups_weight_gradient(backend, dtype, vocab, d, shape, static, ids_dtype):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=gen).to(DEVICE, ids_dtype)
    values = torch.randn(ids.numel(), 2 * d, generator=gen).to(DEVICE, dtype)[:, ::2]  # non-contiguous
    rows, sums = segment_sum_by_id(values, ids, vocab, static_shape=static, backend=backend)
    assert sums.dtype == torch.float32
    want = dense_oracle(values, ids, vocab)
    picked = rows.rows if rows.first is None else rows.rows[rows.first]
    got = sums[rows.grad_rows] if rows.first is None else sums[rows.grad_rows][rows.first]
    assert sorted(picked.tolist()) == sorted(set(ids.reshape(-1).tolist()))
    assert_close_verbose(got, want[picked], rtol=1e-5, atol=1e-6, what="segment sums")
    norm = rows_l2_norm(sums, rows, backend)
    assert_close_verbose(norm, want.norm(), rtol=1e-5, atol=0, what="norm of the segment sums")


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"N = ids.numel\(\) = 3"):
        segment_sum_by_id(torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64), 10)

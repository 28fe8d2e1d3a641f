"""The cases the row-op tests share (tests/ops/, tests/test_compile.py): shapes with odd row lengths and
repeated ids, per-dtype tolerances, a weight with its gradient, and the dense oracles."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fastadv.ops import row_set_from_ids

# (V, D, ids shape, id range): odd row lengths, heavy repeats, a single column, more ids than rows.
SHAPES = [
    pytest.param(50, 60, (3, 13), 50, id="V50-D60-B3-T13"),
    pytest.param(97, 123, (4, 50), 10, id="V97-D123-B4-T50-repeats"),
    pytest.param(8, 1, (5,), 8, id="V8-D1-N5"),
    pytest.param(300, 257, (2, 33), 300, id="V300-D257-B2-T33"),
]


TOL = {torch.float32: (1e-6, 1e-7), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}


def make_case(V, D, ids_shape, id_range, dtype, ids_dtype=torch.int64, transposed=False, seed=0):
    """A weight, its dense gradient (non-zero on the ids' rows only) and the ids, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, id_range, ids_shape, generator=gen).to(ids_dtype)
    upstream = torch.randn(*ids_shape, D, generator=gen)
    grad = torch.zeros(V, D).index_add_(0, ids.reshape(-1).long(), upstream.reshape(-1, D))
    weight = torch.randn(V, D, generator=gen)
    if transposed:  # same values, column-major storage: strides (1, V)
        weight = weight.t().contiguous().t()
        grad = grad.t().contiguous().t()
    return weight.to(DEVICE, dtype), grad.to(DEVICE, dtype), ids.to(DEVICE)


def oracle_norm(grad, ids):
    rows = torch.unique(ids.long())
    return grad[rows].double().square().sum().sqrt()


def oracle_perturbed(weight, grad, ids, epsilon, norm, sign):
    rows = torch.unique(ids.long())
    out = weight.clone()
    g = grad[rows].float()
    delta = epsilon * torch.sign(g) if sign else epsilon * g / norm
    out[rows] = (weight[rows].float() + delta).to(weight.dtype)
    return out


def row_sets(ids, vocab):
    return {
        "compact": row_set_from_ids(ids, vocab, static_shape=False),
        "static": row_set_from_ids(ids, vocab, static_shape=True),
    }

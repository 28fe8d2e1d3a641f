"""The PGD row op (ascent + projection, fused) against the snippet's dense steps."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_verbose, backend_dtype_cases
from row_cases import SHAPES, TOL, make_case, row_sets

from fastadv.ops import row_set_from_ids, rows_l2_norm, rows_pgd_step, rows_restore


def snippet_pgd_steps(weight, grads, epsilon, alpha):
    """The copied PGD's attack() on a whole V x D table, one call per gradient (dense, as copied)."""
    w = weight.clone()
    backup = w.clone()
    for g in grads:
        norm = torch.norm(g.float())
        if norm != 0 and not torch.isnan(norm):
            w = (w.float() + alpha * g.float() / norm).to(w.dtype)
            r = (w.float() - backup.float()).to(w.dtype)
            if torch.norm(r.float()) > epsilon:
                r = (epsilon * r.float() / torch.norm(r.float())).to(w.dtype)
            w = (backup.float() + r.float()).to(w.dtype)
    return w


def second_gradient(grad, seed=5):
    """Another gradient on the same rows (the next ascent step's)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.where(grad != 0, torch.randn(grad.shape, generator=gen).to(grad.device, grad.dtype), 0)


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
@pytest.mark.parametrize("V,D,ids_shape,id_range", SHAPES)
@pytest.mark.parametrize(
    "epsilon,alpha", [(1.0, 0.3), (0.5, 0.4), (0.2, 0.5)], ids=["inside", "projected", "alpha>eps"]
)
def test_three_steps_match_the_snippet_then_restore(backend, dtype, V, D, ids_shape, id_range, epsilon, alpha):
    weight0, grad, ids = make_case(V, D, ids_shape, id_range, dtype)
    grads = [grad, second_gradient(grad), second_gradient(grad, seed=6)]
    want = snippet_pgd_steps(weight0, grads, epsilon, alpha)
    untouched = torch.ones(V, dtype=torch.bool, device=DEVICE)
    untouched[ids.long().reshape(-1)] = False
    rtol, atol = TOL[dtype]
    ok = torch.tensor(True, device=DEVICE)
    for kind, rs in row_sets(ids, V).items():
        weight, backup = weight0.clone(), None
        for g in grads:
            norm = rows_l2_norm(g, rs, backend)
            backup = rows_pgd_step(weight, g, rs, backup, norm, ok, alpha, epsilon, backend)
        assert_close_verbose(weight, want, rtol, atol, what=f"weight after 3 PGD steps ({kind} rows)")
        assert torch.equal(weight[untouched], weight0[untouched]), "rows outside the batch changed"
        moved = (weight.double() - weight0.double()).norm()
        # Within the ball, up to one rounding of each touched element to the weight dtype.
        rounding = torch.finfo(dtype).eps * weight0.abs().max().item() * (D * (~untouched).sum().item()) ** 0.5
        assert moved <= epsilon * (1 + 1e-6) + rounding, f"left the eps ball: {moved}"
        assert moved > 0
        rows_restore(weight, backup, rs, backend)
        assert torch.equal(weight, weight0), f"restore is not bitwise ({kind} rows)"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_path_is_the_snippets_bits_and_kernels_agree(backend):
    weight0, grad, ids = make_case(300, 257, (2, 33), 300, torch.float32)
    grads = [grad, second_gradient(grad)]
    want = snippet_pgd_steps(weight0, grads, 0.5, 0.4)
    weight, backup, rs = weight0.clone(), None, row_set_from_ids(ids, 300)
    for g in grads:
        norm = rows_l2_norm(g, rs, backend)
        backup = rows_pgd_step(weight, g, rs, backup, norm, torch.tensor(True), 0.4, 0.5, backend)
    if backend == "torch":
        assert (weight - want).abs().max().item() <= 1.2e-7 * want.abs().max().item()
    else:
        assert_close_verbose(weight, want, 1e-6, 1e-7, what="kernel path")


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases())
def test_skip_flag_leaves_rows_as_they_are(backend, dtype):
    weight0, grad, ids = make_case(60, 37, (3, 11), 60, dtype)
    rs = row_set_from_ids(ids, 60)
    weight = weight0.clone()
    no = torch.tensor(False, device=DEVICE)
    backup = rows_pgd_step(weight, grad, rs, None, torch.tensor(0.0, device=DEVICE), no, 0.3, 1.0, backend)
    assert torch.equal(weight, weight0), "a skipped first step wrote the weight"
    rows_pgd_step(weight, grad, rs, backup, rows_l2_norm(grad, rs, backend), torch.tensor(True), 0.3, 1.0, backend)
    moved = weight.clone()
    assert not torch.equal(moved, weight0)
    rows_pgd_step(weight, grad, rs, backup, torch.tensor(float("nan")), no, 0.3, 1.0, backend)
    assert torch.equal(weight, moved), "a skipped later step changed the perturbed rows"


def test_backup_of_the_wrong_shape_is_refused():
    weight, grad, ids = make_case(20, 8, (2, 3), 20, torch.float32)
    rs = row_set_from_ids(ids, 20, static_shape=False)
    with pytest.raises(ValueError, match="backup must be"):
        rows_pgd_step(weight, grad, rs, torch.zeros(len(rs) + 1, 8), torch.tensor(1.0), torch.tensor(True), 0.1, 1.0)

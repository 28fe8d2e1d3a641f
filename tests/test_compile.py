"""torch.compile: a compiled model trained with fastadv matches eager; fastadv's kernels are torch.library
custom ops with fake implementations, so a compiled caller's graph holds them without a break."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, relative_difference
from models import batches, bert_loss, tiny_bert
from row_cases import make_case

from fastadv import FGM, PGD, FreeLB, GradientPenalty
from fastadv.ops import RowSet, row_set_from_ids, rows_backup_add, rows_l2_norm, rows_pgd_step, rows_restore
from fastadv.ops.rows_backup_add import _rows_backup_add
from fastadv.ops.rows_l2_norm import _rows_sum_of_squares
from fastadv.ops.rows_pgd_step import _rows_pgd_step
from fastadv.ops.rows_restore import _rows_restore
from fastadv.ops.segment_sum_by_id import _segment_sum, _static_segments

METHODS = {
    "fgm": lambda m: FGM(m),
    "fgm-output": lambda m: FGM(m, target="output"),
    "pgd": lambda m: PGD(m, 0.05, 0.03),
    "pgd-output": lambda m: PGD(m, 0.05, 0.03, target="output"),
    # No random start: a compiled graph draws its random numbers differently from eager.
    "freelb": lambda m: FreeLB(m, adv_max_norm=0.05),
    "gradient-penalty": lambda m: GradientPenalty(m, 0.01),
}


def train(model, adversary, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for ids, labels in data:
        adversary.step(lambda ids=ids, labels=labels: bert_loss(model, ids, labels))
        opt.step()
        opt.zero_grad()


# inductor compiles C++ (CPU) or Triton (CUDA) code for the model: once, for FGM; the other methods
# run on aot_eager, which traces the same graphs (hooks included) without generating code.
@pytest.mark.parametrize("method,compiler", [("fgm", "inductor"), *[(m, "aot_eager") for m in METHODS if m != "fgm"]])
def test_compiled_model_trains_like_eager(method, compiler):
    torch._dynamo.reset()
    eager = tiny_bert()
    compiled_weights = copy.deepcopy(eager)
    compiled = torch.compile(compiled_weights, backend=compiler)
    data = batches(3)
    train(eager, METHODS[method](eager), data)
    train(compiled, METHODS[method](compiled), data)
    assert (
        relative_difference(
            torch.cat([p.detach().flatten() for p in compiled_weights.parameters()]),
            torch.cat([p.detach().flatten() for p in eager.parameters()]),
        )
        <= 1e-5
    )
    assert not torch.equal(eager.get_input_embeddings().weight, tiny_bert().get_input_embeddings().weight)


def op_cases():
    weight, grad, ids = make_case(50, 37, (3, 11), 20, torch.float32)
    rs = row_set_from_ids(ids, 50, static_shape=True)
    first = rs.first.view(torch.uint8)
    norm = rows_l2_norm(grad, rs).reshape(1)
    ok = torch.ones(1, dtype=torch.uint8, device=DEVICE)
    backup = weight.index_select(0, rs.rows)
    _, order, _, start, end = _static_segments(ids.reshape(-1).long(), 50)
    return [
        (_rows_sum_of_squares, (grad, rs.grad_rows, first, True)),
        (_rows_backup_add, (weight.clone(), grad, rs.rows, rs.grad_rows, first, True, norm, ok, 0.5, False)),
        (_rows_restore, (weight.clone(), backup, rs.rows, first, True)),
        (
            _rows_pgd_step,
            (weight.clone(), grad, backup.clone(), rs.rows, rs.grad_rows, first, True, False, norm, ok, 0.3, 1.0),
        ),
        (_segment_sum, (grad[: order.numel()], order, start, end)),
    ]


@pytest.mark.parametrize("case", range(5), ids=["sum_of_squares", "backup_add", "restore", "pgd_step", "segment_sum"])
def test_custom_ops_pass_torch_library_checks(case):
    """Schema, fake implementation, and tracing through AOT dispatch (torch.library.opcheck)."""
    op, args = op_cases()[case]
    torch.library.opcheck(op, args)


def test_a_compiled_function_holds_the_kernels_in_one_graph(monkeypatch):
    """fullgraph=True fails on any graph break: attack + restore on the Triton path compile whole."""
    monkeypatch.setenv("FASTADV_BACKEND", "triton")
    weight0, grad, ids = make_case(50, 37, (3, 11), 20, torch.float32)
    rs = row_set_from_ids(ids, 50, static_shape=True)

    def attack_and_restore(weight, grad, rows, grad_rows, first):
        row_set = RowSet(rows, grad_rows, first)
        norm = rows_l2_norm(grad, row_set, "triton")
        backup = rows_backup_add(weight, grad, row_set, norm, torch.isfinite(norm), 0.5, False, "triton")
        perturbed = weight.clone()
        rows_pgd_step(weight, grad, row_set, backup, norm, torch.isfinite(norm), 0.1, 1.0, "triton")
        rows_restore(weight, backup, row_set, "triton")
        return perturbed

    torch._dynamo.reset()
    compiled = torch.compile(attack_and_restore, backend="aot_eager", fullgraph=True)
    weight = weight0.clone()
    perturbed = compiled(weight, grad, rs.rows, rs.grad_rows, rs.first)
    assert torch.equal(weight, weight0)
    assert not torch.equal(perturbed, weight0)
    expected = weight0.clone()
    rows_backup_add(expected, grad, rs, rows_l2_norm(grad, rs, "torch"), torch.tensor(True), 0.5, False, "torch")
    assert relative_difference(perturbed, expected) <= 1e-6

"""The NaN rule's two multi-tensor steps (fastadv.methods._finite): the check over every gradient, and the
zeroing chosen on the device, both ways, against a per-tensor torch reference."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import ALL_DTYPES, DEVICE, dtype_id
from models import BagOfEmbeddings, batches, tiny_bert
from sync_checks import static_row_sets

from fastadv import FGM
from fastadv.methods._finite import _any_non_finite, zero_if

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s elements, in order: compares NaN payloads and signed zeros too."""
    return t.reshape(-1).contiguous().view(torch.uint8)


def gradients(dtype: torch.dtype) -> list[torch.Tensor]:
    """Odd shapes, a non-contiguous one (a transpose), a 0-dim one and another dtype beside ``dtype``."""
    torch.manual_seed(0)
    return [
        torch.randn(63, 60, device=DEVICE, dtype=dtype),
        torch.randn(17, 5, device=DEVICE, dtype=dtype).t(),
        torch.randn((), device=DEVICE, dtype=dtype),
        torch.randn(7, device=DEVICE, dtype=torch.float32),
        torch.randn(3, 3, device=DEVICE, dtype=torch.float64),
    ]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bad", [None, *BAD], ids=lambda b: f"bad={b}")
@pytest.mark.parametrize("where", [0, 1, 2, 4])
def test_the_check_finds_any_non_finite_element_of_any_gradient(dtype, bad, where):
    grads = gradients(dtype)
    if bad is not None:
        grads[where][(-1,) * grads[where].dim()] = BAD[bad]  # the last element, a transpose's too
    before = [g.clone() for g in grads]
    found = _any_non_finite(grads, {})
    assert found.dtype == torch.bool and found.dim() == 0 and found.device.type == torch.device(DEVICE).type
    assert bool(found) == (bad is not None)
    assert bool(found) == (not all(torch.isfinite(g).all() for g in before)), "the per-tensor reference disagrees"
    for g, b in zip(grads, before, strict=True):  # the values are rewritten as they were, bit for bit
        assert torch.equal(bits(g), bits(b))


@pytest.mark.parametrize("on_host", [True, False], ids=["read", "on-device"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("condition", [False, True])
def test_zero_if_clears_nan_and_inf_or_keeps_every_bit(on_host, dtype, condition):
    grads = gradients(dtype)
    grads[0][0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    grads[1][0, 0] = -0.0
    before = [g.clone() for g in grads]
    zero_if(grads, torch.tensor(condition, device=DEVICE), on_host=on_host)
    for i, (g, b) in enumerate(zip(grads, before, strict=True)):
        expected = torch.where(torch.tensor(condition, device=DEVICE), torch.zeros_like(b), b)  # the reference
        assert torch.equal(bits(g), bits(expected)), (
            f"gradient {i} ({g.dtype}, {tuple(g.shape)}): not as the reference, bit for bit"
        )


def test_the_on_device_zeroing_is_one_op_per_width_whatever_the_number_of_gradients():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view
            return func(*args, **(kwargs or {}))

    def ops(n: int) -> int:
        grads = [torch.randn(5, device=DEVICE) for _ in range(n)]
        with Count() as count:
            found = _any_non_finite(grads, {})
            zero_if(grads, found, on_host=False)
        return count.ops

    assert ops(3) == ops(300)


@pytest.mark.parametrize("where", ["read", "on-device"])
def test_a_step_skipped_for_a_nan_then_a_finite_step_trains_again(backend, where):
    with static_row_sets() if where == "on-device" else contextlib.nullcontext():  # the CUDA path on any device
        step_skipped_for_a_nan_then_a_finite_step()


@pytest.mark.parametrize("where", ["read", "on-device"])
def test_a_step_whose_loss_is_not_finite_is_dropped_whole(backend, where):
    model = tiny_bert()
    fgm = FGM(model)
    ids, labels = batches(1)[0]
    with static_row_sets() if where == "on-device" else contextlib.nullcontext():
        fgm.step(lambda: model(input_ids=ids, labels=labels).loss * float("inf"))
    assert all(not p.grad.count_nonzero() for p in model.parameters() if p.grad is not None)
    assert fgm.skipped_steps == 1


def step_skipped_for_a_nan_then_a_finite_step() -> None:
    model = tiny_bert()
    fgm = FGM(model)
    ids, labels = batches(1)[0]

    def closure():
        return model(input_ids=ids, labels=labels).loss

    closure().backward()
    model.bert.encoder.layer[0].output.dense.weight.grad[0, 0] = float("nan")  # the clean pass's own NaN
    fgm.attack()
    closure().backward()
    fgm.restore()
    assert all(not p.grad.count_nonzero() for p in model.parameters() if p.grad is not None)
    assert fgm.skipped_steps == 1
    model.zero_grad()
    fgm.step(closure)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.bert.encoder.layer[0].output.dense.weight.grad.count_nonzero()
    assert fgm.skipped_steps == 1


def test_a_sparse_gradient_is_checked_and_zeroed_on_its_values(backend):
    model = BagOfEmbeddings().to(DEVICE)
    model.emb.sparse = True
    fgm = FGM(model, target="output")
    ids, labels = batches(1)[0]

    def closure():
        return torch.nn.functional.cross_entropy(model(ids.to(DEVICE)), labels.to(DEVICE))

    fgm.step(closure)
    assert model.emb.weight.grad.is_sparse and model.emb.weight.grad._values().count_nonzero()
    assert fgm.skipped_steps == 0
    model.zero_grad()
    fgm.step(lambda: closure() * float("inf"))
    assert not model.emb.weight.grad._values().count_nonzero()
    assert fgm.skipped_steps == 1

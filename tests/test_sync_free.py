"""attack() and restore(), and the gradient penalty's own part of step(), never wait for the device: no
.item(), bool(), nonzero() or unique() on the path.

On CUDA the check is torch.cuda.set_sync_debug_mode("error"). On any device, every tensor operation
that would sync the host with a CUDA device is made to raise while attack/restore run, and the
row set takes the static-shape form that CUDA uses (sorted ids with first-occurrence flags).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import DEVICE
from models import batches, bert_loss, tiny_bert
from sync_checks import host_syncs_forbidden
from torch import nn

from fastadv import FGM, PGD, GradientPenalty


@pytest.mark.parametrize(
    "emb_name,target,share_rows",
    [
        (None, "weight", True),
        ("emb", "weight", True),
        (None, "output", True),
        (None, "output", False),
    ],
    ids=["input-embedding", "several-parameters", "output-shared-rows", "output-per-position"],
)
def test_attack_and_restore_never_sync(backend, static_rows, emb_name, target, share_rows):
    model = tiny_bert()
    fgm = FGM(model, emb_name=emb_name, target=target, share_rows=share_rows)
    ids, labels = batches(1)[0]
    bert_loss(model, ids, labels).backward()
    before = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():  # forwards without gradients leave the captured micro-batch alone
        clean = model(input_ids=ids).logits
    with host_syncs_forbidden(DEVICE):
        fgm.attack()
        fgm.restore()
        fgm.attack()
        with torch.no_grad():
            perturbed = model(input_ids=ids).logits  # the output hook runs sync-free too
        fgm.restore()
    assert not torch.equal(perturbed, clean), "attack changed nothing: the check would prove nothing"
    assert torch.equal(model.get_input_embeddings().weight, before)


@pytest.mark.parametrize("target", ["weight", "output"])
def test_pgd_attacks_and_restore_never_sync(backend, static_rows, target):
    model = tiny_bert()
    pgd = PGD(model, epsilon=0.05, alpha=0.03, target=target)
    ids, labels = batches(1)[0]
    bert_loss(model, ids, labels).backward()
    before = model.get_input_embeddings().weight.detach().clone()
    with host_syncs_forbidden(DEVICE):
        pgd.attack(is_first_attack=True)
    model.zero_grad()
    bert_loss(model, ids, labels).backward()  # the forward pass itself may sync: it is the model's
    with host_syncs_forbidden(DEVICE):
        pgd.attack()  # a later attack: re-addressing the gradient to the round's rows, projecting
    with torch.no_grad():
        perturbed = model(input_ids=ids).logits
    with host_syncs_forbidden(DEVICE):
        pgd.restore()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    assert not torch.equal(perturbed, clean), "the attacks changed nothing: the check would prove nothing"
    assert torch.equal(model.get_input_embeddings().weight, before)


class GuardedRegion:
    """host_syncs_forbidden entered and left at points no ``with`` block can wrap (inside a method, in hooks)."""

    def __init__(self) -> None:
        self.entered = 0
        self._stack: contextlib.ExitStack | None = None

    def enter(self) -> None:
        self.exit()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(host_syncs_forbidden(DEVICE))
        self.entered += 1

    def exit(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def test_gradient_penalty_step_never_syncs(backend, static_rows):
    """The finite-difference penalty's own part, guarded: from dL/de (the clean pass's backward to the
    embedding output, the model's) to the adversarial forward (the model's), where fastadv checks dL/de
    for NaN/Inf and scales it into the delta; and the adversarial lookup, whose hook adds the delta."""
    model = tiny_bert()
    ids, labels = batches(1)[0]
    gp = GradientPenalty(model, mode="finite_difference")
    region = GuardedRegion()
    lookups: list[torch.Tensor] = []
    passes = 0
    dl_de = gp._first_passes.gradients  # the one seam between the model's backward and fastadv's own part

    def dl_de_then_guard(run) -> list:
        grads = dl_de(run)
        region.enter()
        return grads

    def closure() -> torch.Tensor:
        nonlocal passes
        passes += 1
        region.exit()  # the model's own forward may sync
        return bert_loss(model, ids, labels)

    def before_lookup(module: nn.Module, args: tuple) -> None:
        if passes == 2:
            region.enter()

    def after_lookup(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # runs after fastadv's hook
        lookups.append(output.detach().clone())
        region.exit()

    gp._first_passes.gradients = dl_de_then_guard
    emb = model.get_input_embeddings()
    handles = [emb.register_forward_pre_hook(before_lookup), emb.register_forward_hook(after_lookup)]
    try:
        gp.step(closure)
    finally:
        region.exit()
        for handle in handles:
            handle.remove()
    assert region.entered == 2, f"the guarded regions ran {region.entered} times, not 2: the check proved nothing"
    clean, perturbed = lookups
    assert not torch.equal(perturbed, clean), "the penalty changed nothing: the check would prove nothing"


SYNCS = [pytest.param(lambda x: x.item(), AssertionError, r"Tensor\.item", id="item")]
if DEVICE == "cuda":  # set_sync_debug_mode's part of the guard: a copy the patched methods do not see
    SYNCS.append(
        pytest.param(lambda x: x.to("cpu"), RuntimeError, "synchronizing CUDA operation", id="device-to-host-copy")
    )


@pytest.mark.parametrize("sync,error,message", SYNCS)
def test_the_guard_catches_a_sync(sync, error, message):
    """The guard itself: a path that calls .item() is caught; on CUDA, so is a copy to the host."""
    x = torch.ones(2, device=DEVICE).sum()
    with host_syncs_forbidden(DEVICE), pytest.raises(error, match=message):
        sync(x)

"""attack() and restore() never wait for the device: no .item(), bool(), nonzero() or unique() on the path.

On CUDA the check is torch.cuda.set_sync_debug_mode("error"). On any device, every tensor operation
that would sync the host with a CUDA device is made to raise while attack/restore run, and the
row set takes the static-shape form that CUDA uses (sorted ids with first-occurrence flags).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from models import batches, bert_loss, tiny_bert
from sync_checks import host_syncs_forbidden

from fastadv import FGM, PGD


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


def test_the_guard_catches_a_sync():
    """The guard itself: a path that calls .item() is caught."""
    with host_syncs_forbidden(DEVICE), pytest.raises(AssertionError, match=r"Tensor\.item"):
        torch.ones(2, device=DEVICE).sum().item()

"""Output-side perturbation (target='output'): frozen, tied and accumulated embeddings."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import DEVICE, relative_difference
from models import BagOfEmbeddings, bag_loss, batches, bert_loss, tiny_bert, tiny_gpt2, train_with, twins
from torch import nn

from fastadv import FGM, AttackStateError, EmbeddingNotFoundError, MissingGradientError


def whole_model_difference(a: nn.Module, b: nn.Module) -> float:
    return relative_difference(
        torch.cat([p.detach().flatten() for p in a.parameters()]),
        torch.cat([p.detach().flatten() for p in b.parameters()]),
    )


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-3), ("sgd", 0.1)], ids=["adamw", "sgd"])
def test_output_mode_trains_like_weight_mode(backend, optimizer, lr):
    """share_rows=True is the weight-row perturbation, applied to the lookup's output instead."""
    weight_mode, output_mode = twins(tiny_bert())
    data = batches(4)
    train_with(weight_mode, lambda m: FGM(m, target="weight"), data, bert_loss, optimizer=optimizer, lr=lr)
    train_with(output_mode, lambda m: FGM(m, target="output"), data, bert_loss, optimizer=optimizer, lr=lr)
    assert whole_model_difference(output_mode, weight_mode) <= 1e-5
    emb_out, emb_w = output_mode.get_input_embeddings().weight, weight_mode.get_input_embeddings().weight
    assert relative_difference(emb_out, emb_w) <= 1e-5


def test_one_attack_output_mode_equals_weight_mode(backend):
    weight_mode, output_mode = twins(tiny_bert())
    ids, labels = batches(1)[0]
    losses = []
    for model, target in ((weight_mode, "weight"), (output_mode, "output")):
        fgm = FGM(model, target=target)
        bert_loss(model, ids, labels).backward()
        with fgm.perturbed():
            losses.append(bert_loss(model, ids, labels))
        clean = bert_loss(model, ids, labels)
    assert abs(losses[0] - losses[1]).item() <= 1e-6 * abs(losses[0]).item()
    assert abs(losses[1] - clean).item() > 1e-4, "the perturbation changed nothing: the comparison proves nothing"


def test_frozen_embedding_equals_weight_mode_on_a_copy_whose_embedding_does_not_train(backend, caplog):
    frozen, reference = twins(tiny_bert())
    frozen.get_input_embeddings().weight.requires_grad_(False)
    table = frozen.get_input_embeddings().weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="fastadv"):
        fgm = FGM(frozen)  # auto: the frozen table is perturbed at its output
    assert "frozen" in caplog.text and "target='output'" in caplog.text
    reference_fgm = FGM(reference, target="weight")
    emb = reference.get_input_embeddings().weight
    opt_frozen = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    opt_reference = torch.optim.SGD([p for p in reference.parameters() if p is not emb], lr=0.1)
    for ids, labels in batches(3):
        for model, adversary, opt in ((frozen, fgm, opt_frozen), (reference, reference_fgm, opt_reference)):
            bert_loss(model, ids, labels).backward()
            with adversary.perturbed():
                bert_loss(model, ids, labels).backward()
            opt.step()
            model.zero_grad()
    assert torch.equal(frozen.get_input_embeddings().weight, table)
    assert whole_model_difference(frozen, reference) <= 1e-5


def test_tied_embedding_output_mode_leaves_the_lm_head_untouched(backend, caplog):
    model = tiny_gpt2()
    with caplog.at_level(logging.INFO, logger="fastadv"):
        fgm = FGM(model)
    assert "tied" in caplog.text
    ids = batches(1, seq=9)[0][0]
    head = model.lm_head.weight
    original = head.detach().clone()
    clean = model(input_ids=ids, labels=ids).loss
    clean.backward()
    with fgm.perturbed():
        assert torch.equal(head, original), "the output projection changed during the perturbed pass"
        adversarial = model(input_ids=ids, labels=ids).loss
    assert abs(adversarial - clean).item() > 1e-4, "the input lookup was not perturbed"
    assert torch.equal(head, original)


def test_accumulation_uses_the_current_micro_batch_only(backend):
    (ids_1, labels_1), (ids_2, labels_2) = batches(2, repeats=False)

    def adversarial_loss_after(model, fgm, micro_batches):
        for i, (ids, labels) in enumerate(micro_batches):
            bert_loss(model, ids, labels).backward()
            if i < len(micro_batches) - 1:  # earlier micro-batches: full FGM cycle, no optimizer step
                with fgm.perturbed():
                    bert_loss(model, ids, labels).backward()
        with fgm.perturbed():
            return bert_loss(model, *micro_batches[-1]).item()

    results = {}
    for target in ("output", "weight"):
        accumulated, alone = twins(tiny_bert())
        results[target] = (
            adversarial_loss_after(
                accumulated, FGM(accumulated, target=target), [(ids_1, labels_1), (ids_2, labels_2)]
            ),
            adversarial_loss_after(alone, FGM(alone, target=target), [(ids_2, labels_2)]),
        )
    with_first, second_alone = results["output"]
    assert abs(with_first - second_alone) <= 1e-6 * abs(second_alone)
    weight_with_first, weight_alone = results["weight"]
    assert abs(weight_with_first - weight_alone) > 1e-6 * abs(weight_alone), "weight mode sees .grad: must differ"


def test_per_position_deltas_equal_an_inputs_embeds_reference(backend):
    model, reference = twins(tiny_bert())
    ids, labels = batches(1)[0]
    fgm = FGM(model, epsilon=0.5, target="output", share_rows=False)
    bert_loss(model, ids, labels).backward()
    with fgm.perturbed():
        ours = bert_loss(model, ids, labels)
    embeds = reference.get_input_embeddings()(ids).detach().requires_grad_()
    reference(inputs_embeds=embeds, labels=labels).loss.backward()
    delta = 0.5 * embeds.grad / embeds.grad.norm()
    theirs = reference(inputs_embeds=embeds.detach() + delta, labels=labels).loss
    assert abs(ours - theirs).item() <= 1e-6 * abs(theirs).item()
    shared = FGM(copy.deepcopy(reference), epsilon=0.5, target="output")
    assert shared.share_rows


def test_output_mode_misuse(backend):
    model = BagOfEmbeddings(padding_idx=0).to(DEVICE)
    fgm = FGM(model, target="output")
    ids, labels = batches(1)[0]
    with pytest.raises(MissingGradientError, match="no gradient reached the lookups"):
        fgm.attack()
    bag_loss(model, ids, labels).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fgm.attack()
    with pytest.raises(AttackStateError, match="called again before restore"):
        fgm.attack()
    fgm.restore()
    with pytest.raises(AttackStateError, match="without a matching attack"):
        fgm.restore()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    with pytest.raises(ValueError, match="target must be"):
        FGM(model, target="outputs")
    with pytest.raises(EmbeddingNotFoundError, match=r"not the weight of an nn\.Embedding"):
        FGM(tiny_bert(), emb_name="emb", target="output")


def test_output_that_never_reaches_the_loss():
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model, target="output")
    ids = batches(1)[0][0]
    model.emb(ids)
    model.head(torch.ones(1, 123, device=DEVICE)).sum().backward()
    with pytest.raises(MissingGradientError, match=r"does\s+not reach the loss"):
        fgm.attack()


def test_per_position_delta_needs_the_same_batch(backend):
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model, target="output", share_rows=False)
    ids, labels = batches(1)[0]
    bag_loss(model, ids, labels).backward()
    with pytest.raises(RuntimeError, match="run it on the same batch"), fgm.perturbed():
        model(ids[:, :5])


def test_non_finite_output_gradient_is_skipped_and_counted(backend):
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model, target="output")
    ids = batches(1)[0][0]
    (model(ids).sum() * float("nan")).backward()
    with fgm.perturbed():
        assert torch.isfinite(model(ids)).all()
    assert fgm.skipped_steps == 1


def test_capture_belongs_to_the_last_backward_pass(backend):
    """A forward with gradients and no backward (a metric computed without no_grad, eval() then
    train()) leaves the captured gradient alone: attack() uses the last backpropagated pass."""
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model, target="output")
    (ids, labels), (other_ids, other_labels) = batches(2)
    bag_loss(model, ids, labels).backward()
    for _ in range(2):  # attack may run again on the same backward, as weight mode may on .grad
        with fgm.perturbed(), torch.no_grad():
            want = bag_loss(model, ids, labels)
    model(other_ids).sum()  # gradients on, never backpropagated
    model.eval()
    model(other_ids)
    model.train()
    with fgm.perturbed(), torch.no_grad():
        assert torch.equal(bag_loss(model, ids, labels), want)
    bag_loss(model, other_ids, other_labels).backward()  # a new backward pass: its gradient is the one used
    twin = BagOfEmbeddings().to(DEVICE)  # not a deepcopy: that would copy fgm's hooks too
    twin.load_state_dict(model.state_dict())
    twin_fgm = FGM(twin, target="output")
    bag_loss(twin, other_ids, other_labels).backward()
    with fgm.perturbed(), twin_fgm.perturbed(), torch.no_grad():
        got, expected = bag_loss(model, other_ids, other_labels), bag_loss(twin, other_ids, other_labels)
    assert torch.equal(got, expected)

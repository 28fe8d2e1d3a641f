"""GradientPenalty: exact against an independent double-backward reference; finite difference against exact."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, parameter_gradients
from models import BagOfEmbeddings, bag_loss, batches, bert_loss, tiny_bert, twins
from torch import nn

from fastadv import EmbeddingNotFoundError, FastAdvError, GradientPenalty, MissingGradientError


def reference_penalized_gradients(model: nn.Module, ids, labels, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Through inputs_embeds: J = L + 0.5 * eps * ||dL/de||^2, backpropagated with a double backward."""
    embeds = model.get_input_embeddings()(ids)
    loss = model(inputs_embeds=embeds, labels=labels).loss
    (grad,) = torch.autograd.grad(loss, embeds, create_graph=True)
    penalty = 0.5 * epsilon * grad.square().sum()
    (loss + penalty).backward()
    return parameter_gradients(model), penalty.detach()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def test_exact_step_matches_an_independent_reference():
    ours, reference = twins(tiny_bert(attention="eager"))
    ids, labels = batches(1)[0]
    gp = GradientPenalty(ours, epsilon=0.3, mode="exact")
    clean = gp.step(lambda: bert_loss(ours, ids, labels))
    want, _ = reference_penalized_gradients(reference, ids, labels, 0.3)
    got = parameter_gradients(ours)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert not clean.requires_grad and torch.isclose(clean, bert_loss(reference, ids, labels))


def test_penalty_term_value():
    ours, reference = twins(tiny_bert(attention="eager"))
    ids, labels = batches(1)[0]
    gp = GradientPenalty(ours, epsilon=0.3, mode="exact")
    loss = bert_loss(ours, ids, labels)
    penalty = gp.penalty(loss)
    assert penalty.requires_grad
    _, want = reference_penalized_gradients(reference, ids, labels, 0.3)
    assert torch.isclose(penalty.detach(), want, rtol=1e-5)
    assert penalty.item() > 0


@pytest.mark.parametrize("epsilon", [1e-2, 3e-2])
def test_finite_difference_agrees_with_exact(epsilon):
    fd_model, exact_model = twins(tiny_bert(attention="eager"))
    clean_model = tiny_bert(attention="eager")
    ids, labels = batches(1)[0]
    GradientPenalty(fd_model, epsilon=epsilon).step(lambda: bert_loss(fd_model, ids, labels))
    GradientPenalty(exact_model, epsilon=epsilon, mode="exact").step(lambda: bert_loss(exact_model, ids, labels))
    bert_loss(clean_model, ids, labels).backward()
    fd, exact, clean = (parameter_gradients(m) for m in (fd_model, exact_model, clean_model))
    assert cosine(fd, exact) >= 0.99
    # The penalty's own contribution (the part that is not the plain gradient) agrees too.
    assert cosine(fd - clean, exact - clean) >= 0.99
    size = ((fd - clean).norm() / (exact - clean).norm()).item()
    assert 0.98 <= size <= 1.02, f"finite difference's penalty part is {size:.4f}x the exact one"
    assert (exact - clean).norm() > 1e-3 * clean.norm(), "the penalty changed nothing: the check proves nothing"


def test_exact_mode_without_double_backward_names_finite_difference():
    model = tiny_bert(attention="sdpa")
    ids, labels = batches(1)[0]
    if DEVICE == "cpu":  # SDPA's CPU kernel has no double backward (CUDA's math path may)
        with pytest.raises(FastAdvError, match="mode='finite_difference'"):
            GradientPenalty(model, mode="exact").step(lambda: bert_loss(model, ids, labels))
    model.zero_grad()
    GradientPenalty(model).step(lambda: bert_loss(model, ids, labels))
    assert torch.isfinite(parameter_gradients(model)).all()


@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_frozen_embedding(mode):
    model = tiny_bert(attention="eager")
    table = model.get_input_embeddings().weight
    table.requires_grad_(False)
    ids, labels = batches(1)[0]
    GradientPenalty(model, epsilon=0.1, mode=mode).step(lambda: bert_loss(model, ids, labels))
    assert table.grad is None
    assert torch.isfinite(parameter_gradients(model)).all()


def test_misuse():
    model = BagOfEmbeddings().to(DEVICE)
    with pytest.raises(ValueError, match="mode must be"):
        GradientPenalty(model, mode="double")
    with pytest.raises(EmbeddingNotFoundError, match=r"matches no embedding table"):
        GradientPenalty(model, emb_name="word_embeddings")
    gp = GradientPenalty(model)
    with pytest.raises(MissingGradientError, match="does not depend on any output"):
        gp.step(lambda: model.head(torch.ones(1, 123, device=DEVICE)).sum())
    ids, labels = batches(1)[0]
    with pytest.raises(TypeError, match="scalar tensor"):
        gp.step(lambda: model(ids))
    gp.step(lambda: bag_loss(model, ids, labels))
    assert gp.skipped_steps == 0


def test_non_finite_output_gradient_skips_the_penalty_and_is_counted():
    model = BagOfEmbeddings().to(DEVICE)
    gp = GradientPenalty(model, epsilon=0.1)
    ids, labels = batches(1)[0]
    perturbed_losses = []

    def closure():
        embeds = model.emb(ids)
        never = torch.zeros_like(embeds, dtype=torch.bool)
        # Finite value, NaN gradient: the unselected branch's inf meets a zero in the backward.
        poison = torch.where(never, embeds * float("inf"), 0.0).sum()
        loss = nn.functional.cross_entropy(model.head(torch.tanh(embeds).mean(dim=1)), labels) + poison
        perturbed_losses.append(loss.detach())
        return loss

    gp.step(closure)
    assert gp.skipped_steps == 1
    assert torch.equal(perturbed_losses[0], perturbed_losses[1]), "a skipped penalty must add no delta"

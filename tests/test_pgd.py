"""PGD: the drop-in against the copied snippet, pgd.step against the drop-in, output mode, misuse."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, relative_difference
from measure import GradientCopies  # bench/measure.py (pyproject: pytest pythonpath)
from models import BagOfEmbeddings, bag_loss, batches, bert_loss, tiny_bert, tiny_gpt2, twins
from torch import nn

from fastadv import PGD, AttackStateError, FastAdvError, FastAdvWarning
from fastadv.snippets import SnippetPGD, pgd_snippet_step

K = 3


def whole_model_difference(a: nn.Module, b: nn.Module) -> float:
    return relative_difference(
        torch.cat([p.detach().flatten() for p in a.parameters()]),
        torch.cat([p.detach().flatten() for p in b.parameters()]),
    )


def train_snippet_loop(model, adversary, data, loss_fn, epsilon, alpha, emb_name, lr=1e-3, optimizer="adamw"):
    """The loop every PGD script has, with the snippet's calls."""
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(model.parameters(), lr=lr)
    for ids, labels in data:
        closure = lambda ids=ids, labels=labels: loss_fn(model, ids, labels)  # noqa: E731
        pgd_snippet_step(model, adversary, closure, K, epsilon=epsilon, alpha=alpha, emb_name=emb_name)
        opt.step()
        opt.zero_grad()
    return model


def train_step_loop(model, adversary, data, loss_fn, lr=1e-3, optimizer="adamw"):
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(model.parameters(), lr=lr)
    for ids, labels in data:
        adversary.step(lambda ids=ids, labels=labels: loss_fn(model, ids, labels))
        opt.step()
        opt.zero_grad()
    return model


CASES = [
    pytest.param(tiny_bert, bert_loss, "word_embeddings", id="bert"),
    pytest.param(BagOfEmbeddings, bag_loss, "emb.", id="bag"),
]


@pytest.mark.parametrize("make,loss_fn,emb_name", CASES)
@pytest.mark.parametrize("epsilon,alpha", [(1.0, 0.3), (0.05, 0.03)], ids=["inside-ball", "projected"])
def test_drop_in_trains_to_the_snippets_weights(backend, make, loss_fn, emb_name, epsilon, alpha):
    ours, reference = twins(make().to(DEVICE))
    data = batches(4)
    train_snippet_loop(reference, SnippetPGD(reference), data, loss_fn, epsilon, alpha, emb_name)
    train_snippet_loop(ours, PGD(ours, target="weight"), data, loss_fn, epsilon, alpha, emb_name)
    assert whole_model_difference(ours, reference) <= 1e-5


def test_one_round_moves_the_rows_as_the_snippet_does(backend):
    """Per attack, before any optimizer step: the perturbed table after each of the K attacks."""
    ours, reference = twins(tiny_bert())
    ids, labels = batches(1)[0]
    snippet, pgd = SnippetPGD(reference), PGD(ours, epsilon=0.05, alpha=0.03)
    for model in (ours, reference):
        bert_loss(model, ids, labels).backward()
    for t in range(K):
        snippet.attack(0.05, 0.03, "word_embeddings", is_first_attack=t == 0)
        pgd.attack(is_first_attack=t == 0)
        got, want = ours.get_input_embeddings().weight, reference.get_input_embeddings().weight
        assert relative_difference(got, want) <= 1e-6, f"attack {t}"
        for model in (ours, reference):
            model.zero_grad()
            bert_loss(model, ids, labels).backward()
    clean = tiny_bert().get_input_embeddings().weight
    moved = (ours.get_input_embeddings().weight - clean).norm().item()
    assert abs(moved - 0.05) <= 1e-5, f"projected onto the ball's surface: {moved}"
    pgd.restore()
    assert torch.equal(ours.get_input_embeddings().weight, clean)


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("epsilon,alpha", [(1.0, 0.3), (0.05, 0.03)], ids=["inside-ball", "projected"])
def test_step_equals_the_drop_in_schedule(backend, target, epsilon, alpha):
    stepped, dropped = twins(tiny_bert())
    data = batches(4)
    train_snippet_loop(
        dropped, PGD(dropped, target=target), data, bert_loss, epsilon, alpha, None, optimizer="sgd", lr=0.1
    )
    pgd = PGD(stepped, epsilon=epsilon, alpha=alpha, target=target)
    train_step_loop(stepped, pgd, data, bert_loss, optimizer="sgd", lr=0.1)
    assert whole_model_difference(stepped, dropped) <= 1e-5


def test_step_returns_the_clean_loss_and_restores_bitwise(backend):
    model = tiny_bert()
    ids, labels = batches(1)[0]
    table = model.get_input_embeddings().weight.detach().clone()
    loss = PGD(model).step(lambda: bert_loss(model, ids, labels))
    assert not loss.requires_grad
    assert torch.equal(model.get_input_embeddings().weight, table)
    with torch.no_grad():
        assert torch.equal(loss, bert_loss(model, ids, labels))


# Triton's CPU interpreter copies every tensor a kernel reads to host memory, the gradient
# included; compiled kernels (CUDA) read it in place, so there both backends are checked.
@pytest.mark.parametrize("backend", ["torch"] if DEVICE == "cpu" else ["torch", "triton"], indirect=True)
def test_step_keeps_no_copy_of_parameter_gradients(backend):
    model = tiny_bert()
    ids, labels = batches(1)[0]
    pgd = PGD(model)
    with GradientCopies(model) as mode:
        pgd.step(lambda: bert_loss(model, ids, labels))
    assert mode.count == 0
    model.zero_grad()
    bert_loss(model, ids, labels).backward()
    with GradientCopies(model) as mode:  # the control: the snippet's backup_grad copies them all
        pgd.backup_grad()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert mode.count == len(grads) and mode.bytes == sum(g.numel() * g.element_size() for g in grads)


def test_frozen_embedding_equals_weight_mode_on_a_copy_whose_embedding_does_not_train(backend):
    frozen, reference = twins(tiny_bert())
    frozen.get_input_embeddings().weight.requires_grad_(False)
    table = frozen.get_input_embeddings().weight.detach().clone()
    pgd_frozen, pgd_reference = PGD(frozen, 0.05, 0.03), PGD(reference, 0.05, 0.03, target="weight")
    emb = reference.get_input_embeddings().weight
    opt_frozen = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    opt_reference = torch.optim.SGD([p for p in reference.parameters() if p is not emb], lr=0.1)
    for ids, labels in batches(3):
        for model, pgd, opt in ((frozen, pgd_frozen, opt_frozen), (reference, pgd_reference, opt_reference)):
            pgd.step(lambda model=model, ids=ids, labels=labels: bert_loss(model, ids, labels))
            opt.step()
            model.zero_grad()
    assert torch.equal(frozen.get_input_embeddings().weight, table)
    assert whole_model_difference(frozen, reference) <= 1e-5


def test_tied_embedding_leaves_the_lm_head_untouched(backend):
    model = tiny_gpt2()
    ids = batches(1, seq=9)[0][0]
    head = model.lm_head.weight.detach().clone()
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(torch.equal(m.weight, head)))
    plain = copy.deepcopy(model)
    PGD(model).step(lambda: model(input_ids=ids, labels=ids).loss)
    hook.remove()
    assert seen == [True] * (K + 1)
    plain(input_ids=ids, labels=ids).loss.backward()
    assert relative_difference(model.lm_head.weight.grad, 2 * plain.lm_head.weight.grad) > 1e-4


def test_non_finite_gradient_skips_and_counts(backend):
    model = BagOfEmbeddings().to(DEVICE)
    ids, labels = batches(1)[0]
    table = model.emb.weight.detach().clone()
    pgd = PGD(model)
    bag_loss(model, ids, labels).backward()
    model.emb.weight.grad[ids[0, 0]] = float("nan")
    pgd.attack(is_first_attack=True)
    assert torch.equal(model.emb.weight, table)
    assert pgd.skipped_steps == 1
    pgd.restore()
    assert torch.equal(model.emb.weight, table)


def test_misuse_is_refused_with_a_clear_error():
    model = BagOfEmbeddings().to(DEVICE)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        PGD(model, steps=0)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        PGD(model, alpha=-0.1)
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        PGD(model, epsilon=-1.0)
    with pytest.warns(FastAdvWarning, match="alpha=0.5 > epsilon=0.1"):
        PGD(model, epsilon=0.1, alpha=0.5)
    pgd = PGD(model)
    ids, labels = batches(1)[0]
    bag_loss(model, ids, labels).backward()
    with pytest.raises(AttackStateError, match="before the round's first attack"):
        pgd.attack()
    pgd.attack(is_first_attack=True)
    with pytest.raises(AttackStateError, match="round is in progress"):
        pgd.attack(is_first_attack=True)
    with pytest.raises(AttackStateError, match="call restore"):
        pgd.step(lambda: bag_loss(model, ids, labels))
    pgd.restore()
    with pytest.raises(AttackStateError, match="without backup_grad"):
        pgd.restore_grad()
    with pytest.raises(TypeError, match="scalar"):
        pgd.step(lambda: model(ids))
    with pytest.raises(FastAdvError, match="not an embedding table"):
        PGD(model, emb_name="head").step(lambda: bag_loss(model, ids, labels))


def test_a_failing_pass_inside_step_leaves_the_weights_restored(backend):
    model = tiny_bert()
    ids, labels = batches(1)[0]
    table = model.get_input_embeddings().weight.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return bert_loss(model, ids, labels)

    with pytest.raises(RuntimeError, match="out of memory"):
        PGD(model).step(closure)
    assert torch.equal(model.get_input_embeddings().weight, table)


def test_sparse_embedding_gradient_trains_like_a_dense_one(backend):
    """nn.Embedding(sparse=True): the gradient names its own rows; later attacks re-address them."""
    dense = BagOfEmbeddings().to(DEVICE)
    sparse = BagOfEmbeddings(sparse=True).to(DEVICE)
    sparse.load_state_dict(dense.state_dict())
    data = batches(3)
    train_snippet_loop(dense, SnippetPGD(dense), data, bag_loss, 0.05, 0.03, "emb.", optimizer="sgd", lr=0.1)
    train_snippet_loop(sparse, PGD(sparse), data, bag_loss, 0.05, 0.03, "emb.", optimizer="sgd", lr=0.1)
    assert whole_model_difference(sparse, dense) <= 1e-5


def test_output_mode_per_position_stays_in_the_ball(backend):
    model = tiny_bert()
    ids, labels = batches(1)[0]
    clean = model.get_input_embeddings()(ids).detach()
    table = model.get_input_embeddings().weight.detach().clone()
    perturbed = []
    pgd = PGD(model, epsilon=0.05, alpha=0.03, target="output", share_rows=False)
    bert_loss(model, ids, labels).backward()
    for t in range(K):
        pgd.attack(is_first_attack=t == 0)
        with torch.no_grad():
            perturbed.append(model.bert.embeddings.word_embeddings(ids) - clean)
        model.zero_grad()
        bert_loss(model, ids, labels).backward()
    pgd.restore()
    norms = [p.norm().item() for p in perturbed]
    assert abs(norms[0] - 0.03) <= 1e-6 and all(n <= 0.05 * (1 + 1e-6) for n in norms) and norms[-1] > norms[0]
    assert len({tuple(p[0, 0, :3].tolist()) for p in perturbed}) == K, "each attack moves delta"
    assert torch.equal(model.get_input_embeddings().weight, table)

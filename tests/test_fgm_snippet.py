"""fastadv.FGM against the copied snippet: same calls, same perturbation, same training run."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_verbose, backend_dtype_cases, relative_difference
from models import (
    VOCAB,
    BagOfEmbeddings,
    bag_loss,
    batches,
    bert_loss,
    tiny_bert,
    tiny_gpt2,
    train_with,
    twins,
)
from torch import nn

from fastadv import FGM, FastAdvWarning
from fastadv.snippets import SnippetFGM


def assert_same_weights(ours: nn.Module, reference: nn.Module, per_parameter: bool = False, rtol: float = 1e-5) -> None:
    """Same final weights: the whole model and every embedding table within ``rtol`` (relative).

    ``per_parameter`` checks every tensor too (floored at 1e-7 RMS for tensors that stay near 0).
    It is meant for SGD, where rounding differences propagate linearly. Adam divides each gradient
    by its own magnitude, so a parameter whose gradient is zero up to rounding (attention key
    biases: softmax ignores a shift shared by all keys) moves by +-lr along rounding noise in any two
    runs that sum in a different order, the snippet against itself included.
    """
    theirs = dict(reference.named_parameters())
    whole = relative_difference(
        torch.cat([p.detach().flatten() for p in ours.parameters()]),
        torch.cat([p.detach().flatten() for p in reference.parameters()]),
    )
    assert whole <= rtol, f"whole model: relative difference {whole:.3g} from the snippet's run exceeds {rtol}"
    for name, param in ours.named_parameters():
        if per_parameter or "emb" in name or "wte" in name:
            ref = theirs[name].detach()
            rel = ((param.detach() - ref).norm() / (ref.norm() + 1e-7 * ref.numel() ** 0.5)).item()
            assert rel <= rtol, f"{name}: relative difference {rel:.3g} from the snippet's run exceeds {rtol}"


# (emb_name at construction, attack args, restore args, snippet's attack/restore args)
BERT_CALLS = [
    pytest.param(None, (1.0, "word_embeddings"), ("word_embeddings",), ("word_embeddings",), id="positional"),
    pytest.param(None, (), (), ("word_embeddings",), id="default-input-embedding"),
    pytest.param("word_embeddings", (0.5,), (), ("word_embeddings",), id="emb_name-in-constructor"),
    # 'emb' also matches position/token-type tables (rows) and the embeddings' LayerNorm (dense).
    pytest.param(None, (1.0, "emb"), ("emb",), ("emb",), id="substring-matching-several"),
]


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-3), ("sgd", 0.1)], ids=["adamw", "sgd"])
@pytest.mark.parametrize("ctor_emb_name,attack_args,restore_args,snippet_name", BERT_CALLS)
def test_bert_trains_to_the_snippets_weights(
    backend, ctor_emb_name, attack_args, restore_args, snippet_name, optimizer, lr
):
    ours, reference = twins(tiny_bert())
    data = batches(4)
    epsilon = attack_args[0] if attack_args else (0.5 if ctor_emb_name else 1.0)
    snippet_attack = (1.0 if not attack_args else attack_args[0], *snippet_name)
    if ctor_emb_name:
        snippet_attack = (epsilon, *snippet_name)

    def make_ours(m):
        return FGM(m, epsilon=epsilon, emb_name=ctor_emb_name) if ctor_emb_name else FGM(m)

    train_with(ours, make_ours, data, bert_loss, attack_args, restore_args, optimizer=optimizer, lr=lr)
    train_with(reference, SnippetFGM, data, bert_loss, snippet_attack, snippet_name, optimizer=optimizer, lr=lr)
    assert_same_weights(ours, reference, per_parameter=optimizer == "sgd")
    start = tiny_bert().bert.embeddings.word_embeddings.weight
    moved = relative_difference(ours.bert.embeddings.word_embeddings.weight, start)
    assert moved > 1e-4, "training did not move the embedding: the comparison would prove nothing"


def test_one_attack_equals_the_snippets_perturbation(backend):
    ours, reference = twins(tiny_bert())
    ids, labels = batches(1)[0]
    fgm, snippet = FGM(ours), SnippetFGM(reference)
    for model in (ours, reference):
        bert_loss(model, ids, labels).backward()
    fgm.attack(1.0, "word_embeddings")
    snippet.attack(1.0, "word_embeddings")
    assert fgm.backend == backend
    w_ours, w_ref = ours.bert.embeddings.word_embeddings.weight, reference.bert.embeddings.word_embeddings.weight
    assert relative_difference(w_ours, w_ref) <= 1e-6
    changed = (w_ref != tiny_bert().bert.embeddings.word_embeddings.weight.to(DEVICE)).any(dim=1)
    assert changed.sum() > 1, "the snippet changed no row: nothing was compared"
    fgm.restore()
    snippet.restore("word_embeddings")
    assert torch.equal(w_ours, w_ref)


@pytest.mark.parametrize(
    "kwargs,optimizer",
    [
        pytest.param({}, "adamw", id="plain"),
        pytest.param({"padding_idx": 0}, "adamw", id="padding_idx"),
        pytest.param({"sparse": True}, "sgd", id="sparse-grad"),
    ],
)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_handwritten_model_with_snippet_defaults(backend, kwargs, optimizer, ids_dtype):
    """The snippet's own defaults (emb_name='emb.') on a model with `self.emb`; fastadv's attack() finds it."""
    torch.manual_seed(0)
    ours, reference = twins(BagOfEmbeddings(**kwargs).to(DEVICE))
    data = [(ids.to(ids_dtype), labels) for ids, labels in batches(4)]
    train_with(ours, FGM, data, bag_loss, optimizer=optimizer)
    train_with(reference, SnippetFGM, data, bag_loss, optimizer=optimizer)
    assert_same_weights(ours, reference, per_parameter=True)


def test_non_contiguous_embedding_weight(backend):
    torch.manual_seed(0)
    model = BagOfEmbeddings().to(DEVICE)
    model.emb.weight = nn.Parameter(model.emb.weight.detach().t().contiguous().t())
    assert not model.emb.weight.is_contiguous()
    ours, reference = twins(model)
    data = batches(3)
    train_with(ours, FGM, data, bag_loss)
    train_with(reference, SnippetFGM, data, bag_loss)
    assert_same_weights(ours, reference)


def test_gradient_accumulation_uses_every_micro_batchs_rows(backend):
    """With accumulation, .grad holds earlier micro-batches too: the norm must cover their rows."""
    ours, reference = twins(tiny_bert())
    data = batches(4, repeats=False)
    train_with(ours, FGM, data, bert_loss, (1.0, "word_embeddings"), ("word_embeddings",), accumulate=2)
    train_with(reference, SnippetFGM, data, bert_loss, (1.0, "word_embeddings"), ("word_embeddings",), accumulate=2)
    assert_same_weights(ours, reference)


def test_two_forwards_one_backward(backend):
    """R-Drop style: two lookups before one backward; both batches' rows count."""
    ours, reference = twins(tiny_bert())
    (ids_a, labels_a), (ids_b, labels_b) = batches(2, repeats=False)
    fgm, snippet = FGM(ours), SnippetFGM(reference)
    for model, adversary in ((ours, fgm), (reference, snippet)):
        (bert_loss(model, ids_a, labels_a) + bert_loss(model, ids_b, labels_b)).backward()
        adversary.attack(1.0, "word_embeddings")
    w_ours, w_ref = ours.bert.embeddings.word_embeddings.weight, reference.bert.embeddings.word_embeddings.weight
    assert relative_difference(w_ours, w_ref) <= 1e-6


def test_forward_without_backward_is_not_counted(backend):
    """An evaluation forward with gradients enabled but no backward adds no rows (and so no cost)."""
    model = tiny_bert()
    fgm = FGM(model)
    ids, labels = batches(1)[0]
    bert_loss(model, ids, labels).backward()
    model(input_ids=torch.full_like(ids, VOCAB - 1))  # a lookup whose gradient never comes
    fgm.attack()
    row = model.bert.embeddings.word_embeddings.weight[VOCAB - 1]
    fgm.restore()
    recorder = fgm._recorders[id(model.bert.embeddings.word_embeddings.weight)]
    assert (VOCAB - 1) not in recorder.row_set().rows.tolist()
    assert torch.isfinite(row).all()


def fgsm_reference(model: nn.Module, epsilon: float) -> dict[str, torch.Tensor]:
    weight = model.get_input_embeddings().weight
    backup = weight.data.clone()
    weight.data.add_(epsilon * weight.grad.sign())
    return {"weight": backup}


def test_sign_norm_is_fgsm(backend):
    ours, reference = twins(tiny_bert())
    ids, labels = batches(1)[0]
    fgm = FGM(ours, epsilon=0.01, norm="sign")
    for model in (ours, reference):
        bert_loss(model, ids, labels).backward()
    fgm.attack()
    backup = fgsm_reference(reference, 0.01)
    assert torch.equal(ours.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    fgm.restore()
    assert torch.equal(ours.get_input_embeddings().weight, backup["weight"])


def test_step_equals_the_hand_written_loop(backend):
    ours, reference = twins(tiny_bert())
    data = batches(3)
    fgm = FGM(ours)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    for ids, labels in data:
        clean = fgm.step(lambda ids=ids, labels=labels: bert_loss(ours, ids, labels))
        assert not clean.requires_grad and clean.dim() == 0
        opt.step()
        opt.zero_grad()
    train_with(reference, SnippetFGM, data, bert_loss, (1.0, "word_embeddings"), ("word_embeddings",))
    assert_same_weights(ours, reference)


def test_step_with_a_custom_backward(backend):
    """step(backward=...) routes both passes through the caller's backward (a GradScaler, accelerate)."""
    model = tiny_bert()
    fgm = FGM(model)
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        (loss * 2).backward()

    ids, labels = batches(1)[0]
    fgm.step(lambda: bert_loss(model, ids, labels), backward=backward)
    assert len(calls) == 2 and not torch.equal(calls[0], calls[1])


@pytest.mark.parametrize("backend_name,dtype", backend_dtype_cases())
def test_half_precision_weights(monkeypatch, backend_name, dtype):
    """bf16/fp16 weights: norm accumulated in fp32, the step computed in fp32, stored in the weight's dtype."""
    monkeypatch.setenv("FASTADV_BACKEND", backend_name)
    torch.manual_seed(0)
    model = BagOfEmbeddings(dim=60).to(DEVICE, dtype)
    fgm = FGM(model)
    ids, labels = batches(1)[0]
    nn.functional.cross_entropy(model(ids).float(), labels).backward()
    weight, grad = model.emb.weight, model.emb.weight.grad
    original = weight.detach().clone()
    g = grad.float()
    expected = (original.float() + 0.5 * g / g.norm()).to(dtype)
    fgm.attack(0.5)
    rtol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close_verbose(weight, expected, rtol=rtol, atol=1e-6, what=f"{dtype} perturbed weight")
    assert not torch.equal(weight, original)
    fgm.restore()
    assert torch.equal(weight, original)


def test_twenty_cycles_leave_weights_bitwise_unchanged(backend):
    model = tiny_bert()
    fgm = FGM(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, (ids, labels) in enumerate(batches(20, repeats=False)):
        model.zero_grad()
        bert_loss(model, ids, labels).backward()
        with fgm.perturbed(epsilon=0.1 * (i + 1)):
            bert_loss(model, ids, labels).backward()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed after 20 attack/restore cycles"


def test_restore_keeps_the_parameters_storage(backend):
    """The snippet rebinds param.data to its backup; fastadv copies rows back into the same storage."""
    model = tiny_bert()
    weight = model.get_input_embeddings().weight
    pointer = weight.data_ptr()
    fgm = FGM(model)
    ids, labels = batches(1)[0]
    fgm.step(lambda: bert_loss(model, ids, labels))
    assert weight.data_ptr() == pointer


def test_tied_embeddings_perturb_only_the_batch_rows_and_warn_once(backend):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(FastAdvWarning, match="tied") as caught:
        fgm = FGM(model, target="weight")
    ids = batches(1, seq=9)[0][0]
    weight = model.transformer.wte.weight
    original = weight.detach().clone()
    for _ in range(2):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert (weight.grad.abs().sum(dim=1) > 0).all(), "the LM head gives every row a gradient"
        fgm.attack()
        in_batch = torch.zeros(weight.shape[0], dtype=torch.bool, device=DEVICE)
        in_batch[ids.reshape(-1)] = True
        assert torch.equal(weight[~in_batch], original[~in_batch]), "rows outside the batch were perturbed"
        assert (weight[in_batch] != original[in_batch]).any(dim=1).all()
        fgm.restore()
        assert torch.equal(weight, original)
    assert len([w for w in caught if issubclass(w.category, FastAdvWarning)]) == 1

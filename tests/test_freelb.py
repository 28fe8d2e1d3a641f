"""FreeLB: bit-level agreement with the published algorithm run through inputs_embeds, and its corner cases."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, parameter_gradients, relative_difference
from models import BagOfEmbeddings, bag_loss, batches, tiny_bert, tiny_gpt2, twins
from torch import nn

from fastadv import EmbeddingNotFoundError, FreeLB, MissingGradientError
from fastadv.snippets import freelb_snippet_step

CONFIGS = {
    # adv_lr=0.3 moves every sequence's delta past adv_max_norm=0.2 (its start has norm <= 0.05): projected.
    "l2-init-maxnorm": dict(adv_lr=0.3, adv_steps=3, adv_init_mag=0.05, adv_max_norm=0.2, norm="l2"),
    "linf-init-maxnorm": dict(adv_lr=0.05, adv_steps=3, adv_init_mag=0.02, adv_max_norm=0.025, norm="linf"),
    "l2-keep-clean": dict(adv_lr=0.1, adv_steps=2, keep_clean_loss=True),
}


def max_relative_difference(ours: nn.Module, reference: nn.Module) -> float:
    """The largest ||a - b|| / ||b|| over the models' parameters."""
    pairs = zip(ours.parameters(), reference.parameters(), strict=True)
    return max(relative_difference(a, b) for a, b in pairs)


def bert_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (padding id 0 in the last two positions), their attention mask, labels."""
    ids, labels = batches(1, seed=seed)[0]
    return ids, (ids != 0).long(), labels


def bert_closure(model: nn.Module, ids, mask, labels):
    return lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss


def dropout_bert(seed: int = 0) -> nn.Module:
    """tiny_bert's shape with dropout on (hidden and attention), in training mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=211, hidden_size=60, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(config).to(DEVICE).train()


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_training_matches_the_reference(config):
    ours, reference = twins(tiny_bert())
    start = [p.detach().clone() for p in ours.parameters()]
    data = [bert_batch(seed) for seed in (1, 2, 3)]
    freelb = FreeLB(ours, **CONFIGS[config])
    for model, run in ((ours, freelb.step), (reference, None)):
        torch.manual_seed(123)  # the same random starts in both runs
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for ids, mask, labels in data:
            opt.zero_grad()
            if run is None:
                freelb_snippet_step(model, ids, mask, labels, **CONFIGS[config])
            else:
                run(bert_closure(model, ids, mask, labels), attention_mask=mask)
            opt.step()
    worst = max_relative_difference(ours, reference)
    assert worst <= 1e-5, f"final weights differ from the reference by {worst:.3g} (relative)"
    moved = max(relative_difference(p, s) for p, s in zip(ours.parameters(), start, strict=True))
    assert moved > 1e-4, "training did not move the weights: the comparison proves nothing"
    assert freelb.skipped_steps == 0


@pytest.mark.parametrize("emb_name", [None, "word_embeddings"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_one_step_gradients_and_loss_match_the_reference(config, emb_name):
    ours, reference = twins(tiny_bert())
    ids, mask, labels = bert_batch()
    calls = []
    closure = bert_closure(ours, ids, mask, labels)
    torch.manual_seed(5)
    got_loss = FreeLB(ours, emb_name=emb_name, **CONFIGS[config]).step(
        lambda: calls.append(1) or closure(), attention_mask=mask
    )
    torch.manual_seed(5)
    want_loss = freelb_snippet_step(reference, ids, mask, labels, **CONFIGS[config])
    want, got = parameter_gradients(reference), parameter_gradients(ours)
    assert got.shape == want.shape
    assert relative_difference(got, want) <= 1e-5
    assert not got_loss.requires_grad
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    passes = CONFIGS[config]["adv_steps"] + CONFIGS[config].get("keep_clean_loss", False)
    assert len(calls) == passes


def test_dropout_keeps_the_reference_rng_order():
    ours, reference = twins(dropout_bert())
    other = dropout_bert()
    ids, mask, labels = bert_batch()
    config = dict(adv_lr=0.1, adv_steps=2, adv_init_mag=0.1, norm="l2", keep_clean_loss=True)
    torch.manual_seed(7)
    FreeLB(ours, **config).step(bert_closure(ours, ids, mask, labels), attention_mask=mask)
    torch.manual_seed(7)
    freelb_snippet_step(reference, ids, mask, labels, **config)
    got, want = parameter_gradients(ours), parameter_gradients(reference)
    assert relative_difference(got, want) <= 1e-5
    torch.manual_seed(8)  # another seed: other dropout masks, so dropout is really on
    FreeLB(other, **config).step(bert_closure(other, ids, mask, labels), attention_mask=mask)
    assert relative_difference(parameter_gradients(other), want) > 1e-3


def test_one_adversarial_step_from_zero_is_a_plain_backward():
    ours, clean = twins(tiny_bert())
    ids, mask, labels = bert_batch()
    loss = FreeLB(ours, adv_steps=1).step(bert_closure(ours, ids, mask, labels))
    want = bert_closure(clean, ids, mask, labels)()
    want.backward()
    assert torch.equal(parameter_gradients(ours), parameter_gradients(clean))
    assert torch.equal(loss, want.detach())


# ---------------------------------------------------------------- frozen and tied embeddings


def frozen_bert() -> tuple[nn.Module, nn.Parameter, object]:
    model = tiny_bert()
    model.get_input_embeddings().weight.requires_grad_(False)
    return model, model.get_input_embeddings().weight, lambda m, ids, labels: m(input_ids=ids, labels=labels).loss


def tied_gpt2() -> tuple[nn.Module, nn.Parameter, object]:
    model = tiny_gpt2(tied=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model, model.get_input_embeddings().weight, lambda m, ids, labels: m(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("build", [frozen_bert, tied_gpt2], ids=["frozen-bert", "tied-gpt2"])
def test_frozen_and_tied_embeddings_are_never_written(build):
    model, table, loss_fn = build()
    _, clean = twins(model)
    ids, labels = batches(1)[0]
    before = table.detach().clone()
    unchanged = []

    def closure():
        unchanged.append(torch.equal(table, before))
        return loss_fn(model, ids, labels)

    FreeLB(model, adv_lr=0.1, adv_steps=3, adv_init_mag=0.1).step(closure)
    assert unchanged == [True] * 3 and torch.equal(table, before)
    assert (table.grad is None) == (not table.requires_grad)
    got = parameter_gradients(model)
    assert torch.isfinite(got).all()
    loss_fn(clean, ids, labels).backward()
    assert relative_difference(got, parameter_gradients(clean)) > 1e-3, "the perturbation changed nothing"


# ---------------------------------------------------------------- the random start's mask


def start_perturbation(model: nn.Module, ids, labels, norm: str, attention_mask=None) -> torch.Tensor:
    """delta as the model saw it (perturbed minus clean embedding output) in a one-pass step."""
    seen = []
    freelb = FreeLB(model, adv_steps=1, adv_init_mag=0.5, norm=norm)
    model.emb.register_forward_hook(lambda module, args, output: seen.append(output.detach()))  # after FreeLB's
    freelb.step(lambda: bag_loss(model, ids, labels), attention_mask=attention_mask)
    return seen[0] - model.emb(ids).detach()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_start_mask_rule(norm):
    ids, labels = batches(1)[0]
    ids[1] = 0  # a sequence of padding only: the script's l2 start would be NaN there
    padded = ids == 0
    # No mask, a padding_idx: ids != padding_idx.
    delta = start_perturbation(BagOfEmbeddings(padding_idx=0).to(DEVICE), ids, labels, norm)
    assert torch.isfinite(delta).all()
    assert (delta[padded] == 0).all() and (delta[~padded] != 0).all()
    bound = 0.5 / (delta.shape[-1] * (~padded).sum(1, keepdim=True).clamp(min=1)).sqrt() if norm == "l2" else 0.5
    assert (delta.abs().amax(-1) <= bound * (1 + 1e-6)).all()
    # No mask, no padding_idx: every position.
    delta = start_perturbation(BagOfEmbeddings().to(DEVICE), ids, labels, norm)
    assert (delta != 0).all()
    # An attention mask overrides the padding rule.
    mask = torch.zeros_like(ids)
    mask[:, :3] = 1
    delta = start_perturbation(BagOfEmbeddings(padding_idx=0).to(DEVICE), ids, labels, norm, attention_mask=mask)
    assert (delta[:, 3:] == 0).all() and (delta[:, :3][~padded[:, :3]] != 0).all()


# ---------------------------------------------------------------- NaN/Inf and degenerate sequences


def test_non_finite_gradient_skips_the_ascent_and_is_counted():
    model = BagOfEmbeddings().to(DEVICE)
    ids, labels = batches(1)[0]
    freelb = FreeLB(model, adv_lr=0.5, adv_steps=3)
    losses = []

    def closure():
        loss = bag_loss(model, ids, labels)
        losses.append(loss.detach())
        return loss * 1e38 * 1e38 if len(losses) == 1 else loss  # Inf loss, Inf/NaN gradient: an fp16-like overflow

    freelb.step(closure)
    assert freelb.skipped_steps == 1
    assert torch.equal(losses[1], losses[0]), "a skipped ascent must leave delta at its start (zero)"
    assert torch.isfinite(losses[2]) and losses[2] > losses[1], "the next ascent must run from the kept delta"
    freelb.step(lambda: bag_loss(model, ids, labels))
    assert freelb.skipped_steps == 1


def test_zero_gradient_sequence_with_max_norm_stays_finite():
    model = BagOfEmbeddings().to(DEVICE)
    ids, labels = batches(1)[0]
    freelb = FreeLB(model, adv_lr=0.1, adv_steps=3, adv_max_norm=0.05)
    # Only the first sequence reaches the loss: the others' delta stays exactly zero, where the script's
    # `max / norm * exceed + (1 - exceed)` is NaN and poisons every parameter gradient.
    freelb.step(lambda: nn.functional.cross_entropy(model(ids)[:1], labels[:1]))
    assert torch.isfinite(parameter_gradients(model)).all()
    assert freelb.skipped_steps == 0


# ---------------------------------------------------------------- misuse and housekeeping


def test_misuse():
    model = BagOfEmbeddings().to(DEVICE)
    ids, labels = batches(1)[0]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        FreeLB(lambda x: x)
    for steps in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="adv_steps must be an int >= 1"):
            FreeLB(model, adv_steps=steps)
    for name in ("adv_lr", "adv_init_mag", "adv_max_norm"):
        for bad in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be finite and >= 0"):
                FreeLB(model, **{name: bad})
        with pytest.raises(TypeError, match=f"{name} must be a Python float"):
            FreeLB(model, **{name: torch.tensor(0.1)})
    with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
        FreeLB(model, norm="l1")
    with pytest.raises(EmbeddingNotFoundError, match=r"matches no embedding table"):
        FreeLB(model, emb_name="word_embeddings")
    with pytest.raises(EmbeddingNotFoundError, match=r"matches 3 embedding tables"):
        FreeLB(tiny_bert(), emb_name="embeddings")

    freelb = FreeLB(model, adv_init_mag=0.1)
    with pytest.raises(TypeError, match="scalar tensor"):
        freelb.step(lambda: model(ids))
    with pytest.raises(MissingGradientError, match="never looked up"):
        freelb.step(lambda: model.head(torch.ones(1, 123, device=DEVICE)).sum())
    with pytest.raises(MissingGradientError, match="does not reach the loss"):
        freelb.step(lambda: model.emb(ids).sum().detach() + model.head(torch.ones(1, 123, device=DEVICE)).sum())
    freelb.step(lambda: bag_loss(model, ids, labels) + bag_loss(model, ids, labels))  # two lookups, two deltas
    lookups = iter([1, 2])
    with pytest.raises(RuntimeError, match=r"differently from the first pass .*made 1 lookups"):
        freelb.step(lambda: sum(bag_loss(model, ids, labels) for _ in range(next(lookups))))
    lookups = iter([2, 1])
    with pytest.raises(RuntimeError, match="1 times, the first pass of this step 2 times"):
        freelb.step(lambda: sum(bag_loss(model, ids, labels) for _ in range(next(lookups))))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        freelb.step(lambda: bag_loss(model, ids, labels), attention_mask=torch.ones(4, 5))
    with pytest.raises(TypeError, match="attention_mask must be"):
        freelb.step(lambda: bag_loss(model, ids, labels), attention_mask=[[1, 1]])
    with pytest.raises(ValueError, match="ids of shape B x T"):
        freelb.step(lambda: model.head(model.emb(ids[0])).sum())
    calls = []

    def changing_batch():
        calls.append(1)
        rows = len(ids) if len(calls) == 1 else 2
        return bag_loss(model, ids[:rows], labels[:rows])

    with pytest.raises(RuntimeError, match="same batch"):
        freelb.step(changing_batch)
    # After every error above, the hook is inactive again and a correct step still works.
    assert torch.equal(model.emb(ids), model.emb.weight[ids])
    freelb.step(lambda: bag_loss(model, ids, labels))
    assert freelb.skipped_steps == 0


def test_hook_is_inactive_outside_step_and_removable():
    model = BagOfEmbeddings().to(DEVICE)
    ids, labels = batches(1)[0]
    clean = model.emb(ids).detach()
    freelb = FreeLB(model, adv_steps=2, adv_init_mag=0.5)
    assert torch.equal(model.emb(ids), clean)
    freelb.step(lambda: bag_loss(model, ids, labels))
    assert torch.equal(model.emb(ids), clean)
    text = repr(freelb)
    assert text.startswith("FreeLB(adv_lr=0.1, adv_steps=2, adv_init_mag=0.5") and "embedding='emb.weight'" in text
    freelb.remove_hooks()
    with pytest.raises(RuntimeError, match="remove_hooks"):
        freelb.step(lambda: bag_loss(model, ids, labels))

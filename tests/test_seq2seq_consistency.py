"""VAT, SMART and R3F on encoder-decoder models (T5, BART) against ``inputs_embeds`` references that mask the
decoder's positions with the decoder's own mask.

The logits of an encoder-decoder model are the decoder's positions (B x T_dec x V): the divergence averages
over ``decoder_attention_mask``'s positions, never the encoder's ``attention_mask``. Both lookups of the shared
table are perturbed (the encoder's ids, then the decoder's inputs), VAT's deltas each on their own mask. The
encoder and decoder lengths are equal or differ, with padding on both sides; the noise is drawn from a
counted sequence that fastadv and the reference share.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import parameter_gradients, relative_difference
from test_trainer_subclasses import t5
from torch import nn

import fastadv.methods.consistency as consistency
from fastadv import R3F, SMART, VAT

VOCAB = 40  # ids drawn below it; T5's table (test_trainer_subclasses) has 64 rows
MATCH = 1e-5


def bart() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


MODELS = {"t5": t5, "bart": bart}


def seq2seq_batch(model: nn.Module, target_length: int) -> dict[str, torch.Tensor]:
    """3 sources of 9 ids (the second padded from 6 on), 3 targets of ``target_length`` (the third padded from 3
    on: labels -100 there, and a decoder_attention_mask of 0)."""
    g = torch.Generator().manual_seed(7)
    pad = model.config.pad_token_id
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], ids[1, 6:] = 0, pad
    labels = torch.randint(3, VOCAB, (3, target_length), generator=g)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[2, 3:] = 0
    labels = labels.masked_fill(decoder_mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": decoder_mask}


def shared_noise(monkeypatch) -> Callable[[], None]:
    """The methods' draws from a counted sequence (the reference draws the same); returns its restart."""
    calls = [0]

    def noise(kind: str, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        g = torch.Generator().manual_seed(calls[0])
        if kind == "normal":
            return torch.randn(output.shape, generator=g)
        return torch.rand(output.shape, generator=g) * 2 - 1

    monkeypatch.setattr(consistency, "random_like", noise)
    return lambda: calls.__setitem__(0, 0)


# ------------------------------------------------------------ the references, on inputs_embeds


def forward(model: nn.Module, b: dict, deltas: tuple[torch.Tensor, torch.Tensor] | None):
    """The model on its two lookups' outputs (plus ``deltas``: the encoder's, the decoder's)."""
    embed = model.get_input_embeddings()
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=b["labels"])
    encoder_e, decoder_e = embed(b["input_ids"]), embed(decoder_ids)
    if deltas is not None:
        encoder_e, decoder_e = encoder_e + deltas[0], decoder_e + deltas[1]
    return model(
        inputs_embeds=encoder_e, attention_mask=b["attention_mask"], decoder_inputs_embeds=decoder_e,
        decoder_attention_mask=b["decoder_attention_mask"], labels=b["labels"],
    )  # fmt: skip


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per decoder position, the mean over the decoder mask's positions."""
    per = F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), reduction="none", log_target=True)
    return (per.sum(-1) * mask).sum() / mask.sum()


def draws(model: nn.Module, b: dict, kind: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's and the decoder's noise, in the order fastadv draws them (its lookups' order)."""
    d = model.config.d_model
    out = []
    for shape, call in ((b["input_ids"].shape, 1), (b["labels"].shape, 2)):
        g = torch.Generator().manual_seed(call)
        values = torch.randn((*shape, d), generator=g) if kind == "normal" else torch.rand((*shape, d), generator=g)
        out.append((values if kind == "normal" else values * 2 - 1) * scale)
    return out[0], out[1]


def unit(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x * mask[..., None]
    return x / x.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]


def reference_r3f(model: nn.Module, b: dict, epsilon: float) -> None:
    out = forward(model, b, None)
    noisy = forward(model, b, draws(model, b, "uniform", epsilon)).logits
    m = b["decoder_attention_mask"]
    (out.loss + kl(out.logits, noisy, m) + kl(noisy, out.logits, m)).backward()


def reference_vat(model: nn.Module, b: dict, epsilon: float, xi: float) -> None:
    out = forward(model, b, None)
    masks = (b["attention_mask"], b["decoder_attention_mask"])
    r = [xi * unit(d, m) for d, m in zip(draws(model, b, "normal", 1.0), masks, strict=True)]
    r = [x.detach().requires_grad_() for x in r]
    divergence = kl(out.logits.detach(), forward(model, b, tuple(r)).logits, masks[1])
    grads = torch.autograd.grad(divergence, r)
    r_adv = tuple(epsilon * unit(g, m) for g, m in zip(grads, masks, strict=True))
    (out.loss + kl(out.logits.detach(), forward(model, b, r_adv).logits, masks[1])).backward()


def reference_smart(model: nn.Module, b: dict, epsilon: float, step_size: float, noise_var: float) -> None:
    out = forward(model, b, None)
    m = b["decoder_attention_mask"]
    noise = [x.detach().requires_grad_() for x in draws(model, b, "normal", noise_var)]
    divergence = kl(out.logits.detach(), forward(model, b, tuple(noise)).logits, m)
    grads = torch.autograd.grad(divergence, noise)
    moved = [
        n + step_size * g / g.abs().amax(-1, keepdim=True).clamp(min=1e-12) for n, g in zip(noise, grads, strict=True)
    ]
    adv = forward(model, b, tuple(x.clamp(-epsilon, epsilon).detach() for x in moved)).logits
    (out.loss + kl(out.logits.detach(), adv, m) + kl(adv.detach(), out.logits, m)).backward()


CASES = {
    "r3f": (lambda m: R3F(m, epsilon=0.3), lambda m, b: reference_r3f(m, b, 0.3)),
    "vat": (lambda m: VAT(m, epsilon=1.0, xi=0.3), lambda m, b: reference_vat(m, b, 1.0, 0.3)),
    "smart": (
        lambda m: SMART(m, epsilon=0.05, step_size=0.02, noise_var=0.01),
        lambda m, b: reference_smart(m, b, 0.05, 0.02, 0.01),
    ),
}


@pytest.mark.parametrize("target_length", [9, 5], ids=["equal-lengths", "shorter-targets"])
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("method", list(CASES))
def test_the_term_averages_over_the_decoders_positions(monkeypatch, method, family, target_length):
    restart = shared_noise(monkeypatch)
    make, reference = CASES[method]
    model, twin = MODELS[family](), MODELS[family]()
    b = seq2seq_batch(model, target_length)
    make(model).step(
        lambda: model(**b), attention_mask=b["attention_mask"], decoder_attention_mask=b["decoder_attention_mask"]
    )
    restart()
    reference(twin, b)
    difference = relative_difference(parameter_gradients(model), parameter_gradients(twin))
    assert difference <= MATCH, f"{method} on {family}: gradients differ from the reference by {difference:.3g}"


@pytest.mark.parametrize("method", list(CASES))
def test_the_encoders_mask_alone_is_refused_on_an_encoder_decoder(method):
    model = t5()
    b = seq2seq_batch(model, 9)  # equal lengths: the encoder's mask would fit the logits, and be wrong there
    adversary = CASES[method][0](model)
    with pytest.raises(ValueError, match="pass decoder_attention_mask="):
        adversary.step(lambda: model(**b), attention_mask=b["attention_mask"])
    assert all(p.grad is None for p in model.parameters()), "a refused step wrote a gradient"
    with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(3, 4\)"):
        adversary.step(lambda: model(**b), attention_mask=b["attention_mask"], decoder_attention_mask=torch.ones(3, 4))

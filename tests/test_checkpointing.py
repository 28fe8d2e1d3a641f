"""Activation checkpointing (transformers' gradient_checkpointing_enable), reentrant or not.

Reentrant checkpointing rebuilds the checkpointed layers' graph inside backward, so it refuses
torch.autograd.grad: the passes that take dL/de that way (pgd.step's inner passes, the finite-difference
penalty's first pass, VAT's and SMART's ascent) then take it with a backward() whose parameter gradients
are dropped, and train as without checkpointing. The exact penalty's double backward cannot: it raises
fastadv's error. Everything that needs only backward() trains as without checkpointing, and non-reentrant
checkpointing works for every method.
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative_difference
from models import batches, bert_loss, tiny_bert
from torch import nn

from fastadv import FGM, PGD, FreeLB, GradientPenalty, ReentrantCheckpointError
from fastadv.snippets import pgd_snippet_step

# transformers 5 renames gradient_checkpointing_enable (what training scripts call) activation_checkpointing_enable.
pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.* is deprecated:FutureWarning")
BACKWARD_ONLY = ["fgm_calls", "fgm_step", "pgd_calls", "freelb"]
DL_DE = ["pgd_step", "gp_finite_difference", "gp_exact"]
BACKWARD_FALLBACK = ["pgd_step", "gp_finite_difference"]  # dL/de by a backward() under reentrant checkpointing


def checkpointed(reentrant: bool | None) -> nn.Module:
    """tiny_bert (eager attention: the exact penalty's double backward), checkpointed unless None."""
    model = tiny_bert(attention="eager")
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_gradient_checkpointing and model.training
    return model


def make(method: str, model: nn.Module):
    if method.startswith("fgm"):
        return FGM(model)
    if method.startswith("pgd"):
        return PGD(model, epsilon=0.05, alpha=0.03, target="weight")
    if method == "freelb":
        return FreeLB(model, adv_lr=0.1, adv_steps=3, adv_init_mag=0.05)
    return GradientPenalty(model, epsilon=0.01, mode=method.removeprefix("gp_"))


def train(method: str, model: nn.Module, data: list) -> None:
    adversary = make(method, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)  # FreeLB's random start
    for ids, labels in data:

        def closure(ids=ids, labels=labels):
            return bert_loss(model, ids, labels)

        if method == "fgm_calls":
            closure().backward()
            adversary.attack()
            closure().backward()
            adversary.restore()
        elif method == "pgd_calls":
            pgd_snippet_step(model, adversary, closure, adversary.steps)
        else:
            adversary.step(closure)
        opt.step()
        opt.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "method,reentrant",
    [pytest.param(m, True, id=f"{m}-reentrant") for m in BACKWARD_ONLY + BACKWARD_FALLBACK]
    + [pytest.param(m, False, id=f"{m}-non-reentrant") for m in BACKWARD_ONLY + DL_DE],
)
def test_checkpointed_training_equals_the_plain_run(method, reentrant):
    data = batches(3)
    plain, ours = checkpointed(None), checkpointed(reentrant)
    train(method, plain, data)
    train(method, ours, data)
    assert relative_difference(flat(plain), flat(tiny_bert(attention="eager"))) > 1e-4, "nothing trained"
    whole = relative_difference(flat(ours), flat(plain))
    assert whole <= 1e-6, f"{method}: the checkpointed run's weights differ by {whole:.3g} (relative)"


@pytest.mark.parametrize("method", sorted(set(DL_DE) - set(BACKWARD_FALLBACK)))
def test_dl_de_passes_under_reentrant_checkpointing_raise_and_leave_the_weights(method):
    model = checkpointed(True)
    adversary = make(method, model)
    before = [p.detach().clone() for p in model.parameters()]
    ids, labels = batches(1)[0]
    with pytest.raises(ReentrantCheckpointError) as caught:
        adversary.step(lambda: bert_loss(model, ids, labels))
    message = str(caught.value)
    assert "reentrant activation checkpointing" in message and "torch.autograd.grad" in message
    assert "gradient_checkpointing_kwargs={'use_reentrant': False}" in message
    assert "TrainingArguments" in message and "use_reentrant_gc: false" in message, "the knobs frameworks give"
    assert ("backup_grad()" in message) == (method == "pgd_step"), "PGD's way around it, and only PGD's"
    assert isinstance(caught.value.__cause__, RuntimeError), "torch's own error is kept as the cause"
    # pgd.step had perturbed the rows (its first ascent) when its inner pass raised: restored bit for bit.
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if method == "pgd_step":
        assert adversary._attacked is None, "the round is over: a new step or attack() may start"
        model.gradient_checkpointing_disable()
        model.zero_grad()
        adversary.step(lambda: bert_loss(model, ids, labels))  # and it trains once checkpointing is off
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_other_errors_in_a_dl_de_pass_pass_through():
    """Only reentrant checkpointing's refusal becomes ReentrantCheckpointError."""

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom in backward")

    model = checkpointed(None)
    gp = GradientPenalty(model, epsilon=0.01)
    ids, labels = batches(1)[0]
    with pytest.raises(RuntimeError, match="boom in backward") as caught:
        gp.step(lambda: Boom.apply(bert_loss(model, ids, labels)))
    assert not isinstance(caught.value, ReentrantCheckpointError)


@pytest.mark.parametrize("method", ["vat", "smart"])
def test_vat_and_smart_ascents_under_reentrant_checkpointing_equal_the_plain_run(method):
    # Two micro-batches accumulated: the fallback's backward() must leave the first one's gradient as it found it.
    from fastadv import SMART, VAT

    make = {"vat": lambda m: VAT(m, epsilon=1.0, xi=0.3), "smart": lambda m: SMART(m, epsilon=0.05, step_size=0.02)}
    grads = {}
    for reentrant in (None, True):
        model = checkpointed(reentrant)
        adversary = make[method](model)
        torch.manual_seed(0)
        for ids, labels in batches(2):
            adversary.step(lambda ids=ids, labels=labels, model=model: model(input_ids=ids, labels=labels))
        grads[reentrant] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        if reentrant:
            assert adversary._inner_passes.reentrant, "the ascent never met reentrant checkpointing's refusal"
    difference = relative_difference(grads[True], grads[None])
    assert grads[True].shape == grads[None].shape and difference <= 1e-6, f"{method}: differ by {difference:.3g}"

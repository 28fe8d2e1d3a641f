"""Mixed precision: autocast bf16/fp16 and GradScaler. A scaled loss gives the same perturbation; an
overflowing step is skipped on the device, counted, and never leaves NaN in the weights."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, relative_difference
from models import batches, bert_loss, tiny_bert, twins

from fastadv import FGM, PGD, FreeLB, GradientPenalty

METHODS = {
    "fgm": lambda m: FGM(m),
    "fgm-output": lambda m: FGM(m, target="output"),
    "pgd": lambda m: PGD(m, 0.05, 0.03),
    "freelb": lambda m: FreeLB(m, adv_init_mag=0.05, adv_max_norm=0.1),
    "gradient-penalty": lambda m: GradientPenalty(m, 0.01),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_autocast_training_stays_finite_and_moves(backend, dtype, method):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    adversary = METHODS[method](model)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12, enabled=dtype == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for ids, labels in batches(3):

        def closure(ids=ids, labels=labels):
            with torch.autocast(DEVICE, dtype=dtype):
                return bert_loss(model, ids, labels)

        adversary.step(closure, backward=lambda loss: scaler.scale(loss).backward())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)), "nothing trained"


@pytest.mark.parametrize("target", ["weight", "output"])
def test_a_scaled_loss_gives_the_same_perturbation(backend, target):
    plain, scaled = twins(tiny_bert())
    ids, labels = batches(1)[0]
    perturbed = []
    for model, scale in ((plain, 1.0), (scaled, 2.0**12)):
        fgm = FGM(model, target=target)
        (bert_loss(model, ids, labels) * scale).backward()
        with fgm.perturbed(), torch.no_grad():
            perturbed.append(model.get_input_embeddings()(ids))
    assert relative_difference(perturbed[1], perturbed[0]) <= 1e-6
    with torch.no_grad():
        assert not torch.equal(perturbed[0], plain.get_input_embeddings()(ids)), "the attack changed nothing"


@pytest.mark.parametrize("method", list(METHODS))
def test_an_overflowing_fp16_step_is_skipped_and_never_nan(backend, method):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    adversary = METHODS[method](model)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**100)  # fp16 gradients overflow at this scale
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, labels = batches(1)[0]

    def closure():
        with torch.autocast(DEVICE, dtype=torch.float16):
            return bert_loss(model, ids, labels)

    adversary.step(closure, backward=lambda loss: scaler.scale(loss).backward())
    scaler.step(opt)  # sees the Inf gradients: skips the update
    scaler.update()
    assert scaler.get_scale() < 2.0**100, "the scaler saw no overflow: the test proves nothing"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if hasattr(adversary, "skipped_steps") and not isinstance(adversary, GradientPenalty):
        assert adversary.skipped_steps >= 1


def test_scaler_keeps_the_dl_de_only_passes_from_underflowing(backend):
    """Under fp16 autocast a tiny loss gives dL/de that underflows to 0 unless it is scaled like the backward."""
    tiny = 2.0**-24  # the loss scaled down so far that fp16 activation gradients flush to zero

    def pgd_displacements(scaler):
        model = tiny_bert()
        clean = model.get_input_embeddings().weight.detach().clone()
        ids, labels = batches(1)[0]
        moved = []

        def closure():
            moved.append((model.get_input_embeddings().weight - clean).norm().item())
            with torch.autocast(DEVICE, dtype=torch.float16):
                return bert_loss(model, ids, labels) * tiny

        backward_scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**24)
        PGD(model, epsilon=1.0, alpha=0.1).step(
            closure, backward=lambda loss: backward_scaler.scale(loss).backward(), scaler=scaler
        )
        return moved  # per pass: clean, after attack 1, 2, 3

    stuck = pgd_displacements(None)
    assert stuck[1] == pytest.approx(0.1, rel=1e-4) and stuck[3] == pytest.approx(0.1, rel=1e-4), stuck
    moving = pgd_displacements(torch.amp.GradScaler(DEVICE, init_scale=2.0**24))
    assert moving[3] > 0.15, moving


def test_scaler_gives_the_finite_difference_penalty_its_gradient(backend):
    tiny = 2.0**-24

    def penalty_delta(scaler):
        model = tiny_bert()
        ids, labels = batches(1)[0]
        gp = GradientPenalty(model, epsilon=2.0**30)  # eps * dL/de of a tiny loss: a visible delta
        outputs = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: outputs.append(out.detach()))

        def closure():
            with torch.autocast(DEVICE, dtype=torch.float16):
                return bert_loss(model, ids, labels) * tiny

        gp.step(closure, backward=lambda loss: (loss * 2.0**24).backward(), scaler=scaler)
        hook.remove()
        return (outputs[1] - outputs[0]).norm().item()

    assert penalty_delta(None) == 0.0, "dL/de did not underflow: the test proves nothing"
    assert penalty_delta(torch.amp.GradScaler(DEVICE, init_scale=2.0**24)) > 0

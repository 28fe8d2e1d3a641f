"""Integrations: transformers' Trainer, accelerate and Lightning train to the weights of a hand-written loop.

Every run is on CPU tensors (the integrations are control flow; the kernels have their own tests):
12 examples, micro-batches of 2, 2 micro-batches per optimizer step, 3 steps, SGD (its update is
proportional to the gradient, so a wrong loss scale shows), no clipping, a constant learning rate.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import relative_difference
from models import VOCAB, tiny_bert
from torch import nn

import fastadv.methods.consistency as consistency
from fastadv import FGM, PGD, R3F, SMART, VAT, FreeLB, GradientPenalty

MICRO, ACCUM, STEPS, SEQ, LR = 2, 2, 3, 11, 0.1
MATCH = 1e-5  # relative difference of the weight updates, Trainer/Lightning against the hand loop


def examples(n: int = MICRO * ACCUM * STEPS, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Dicts of input_ids and attention_mask (SEQ,) and a label (); lengths 9 to 11, padded with id 0."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.zeros(SEQ, dtype=torch.long)
        length = SEQ - i % 3
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=gen)
        label = torch.randint(0, 3, (), generator=gen)
        items.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": label})
    return items


class Examples(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.items = examples()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """The examples in order, stacked MICRO at a time (what the sequential loaders yield)."""
    items = examples()
    groups = [items[i : i + MICRO] for i in range(0, len(items), MICRO)]
    return [{key: torch.stack([item[key] for item in group]) for key in group[0]} for group in groups]


def bert() -> nn.Module:
    """tiny_bert (seed 0, no dropout): every call returns the same weights."""
    return tiny_bert().to("cpu")


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_same_training(trained: nn.Module, reference: nn.Module, initial: torch.Tensor, what: str) -> None:
    """The weights' updates agree to MATCH (so the weights agree far more closely)."""
    update = relative_difference(flat(trained) - initial, flat(reference) - initial)
    weights = relative_difference(flat(trained), flat(reference))
    assert update <= MATCH, f"{what}: updates differ by {update:.3g} (weights by {weights:.3g}), want <= {MATCH}"


def step_with(adversary: object | None) -> Callable:
    """How the hand loop runs one micro-batch's passes: the adversary's step, or one plain backward."""

    def run(closure: Callable, backward: Callable, batch: dict) -> torch.Tensor:
        if adversary is None:
            loss = closure()
            backward(loss)
            return loss.detach()
        kwargs = {"attention_mask": batch["attention_mask"]} if isinstance(adversary, FreeLB) else {}
        return adversary.step(closure, backward=backward, **kwargs)

    return run


def hand_loop(model: nn.Module, step: Callable, divide: bool) -> list[torch.Tensor]:
    """SGD, an optimizer step every ACCUM micro-batches; each micro-batch's loss divided by ACCUM if ``divide``.

    Returns the losses the step returned, scaled as the backward scales them.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    losses = []
    for i, batch in enumerate(micro_batches()):

        def backward(loss: torch.Tensor) -> None:
            (loss / ACCUM if divide else loss).backward()

        loss = step(lambda batch=batch: model(**batch).loss, backward, batch)
        losses.append(loss / ACCUM if divide else loss)
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            model.zero_grad()
    return losses


# ------------------------------------------------------------ transformers.Trainer


def training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def adversarial_trainer(model: nn.Module, adversary: object, tmp_path, divide: bool | None = None, **overrides):
    """An AdversarialTrainer on Examples; ``divide`` sets loss_is_scaled_for_ga = not divide (None: Trainer's rule)."""
    from fastadv.integrations.hf import AdversarialTrainer

    class Scaled(AdversarialTrainer):
        loss_is_scaled_for_ga = None if divide is None else not divide

    return Scaled(adversary=adversary, model=model, args=training_args(tmp_path, **overrides), train_dataset=Examples())


@pytest.mark.parametrize("divide", [None, True], ids=["trainer-rule", "divided-by-accum"])
def test_trainer_with_fgm_trains_to_the_hand_loops_weights(tmp_path, divide):
    model, reference = bert(), bert()
    initial = flat(model)
    trainer = adversarial_trainer(model, FGM(model), tmp_path, divide=divide)
    if divide is None:
        # What Trainer does for BertForSequenceClassification: its forward takes **kwargs, so Trainer passes
        # num_items_in_batch and counts the loss as normalized, but BERT takes the mean over its micro-batch: no
        # division by the accumulation steps.
        assert trainer.model_accepts_loss_kwargs
    result = trainer.train()
    assert trainer.state.global_step == STEPS

    losses = hand_loop(reference, step_with(FGM(reference)), divide=bool(divide))
    assert_same_training(model, reference, initial, "AdversarialTrainer + FGM against the hand loop")
    # Trainer logs the mean over optimizer steps of the losses training_step returned.
    want = torch.stack(losses).sum().item() / STEPS
    assert result.training_loss == pytest.approx(want, rel=1e-6)


METHODS = {
    "pgd": lambda model: PGD(model, epsilon=1.0, alpha=0.3, steps=2),
    "freelb": lambda model: FreeLB(model, adv_lr=0.3, adv_steps=2),
    "gradient-penalty": lambda model: GradientPenalty(model, epsilon=0.5),
}


def masks_given_to_step(adversary: object) -> list:
    """The attention_mask each call of ``adversary.step`` gets, recorded in the list returned."""
    masks, step = [], adversary.step

    def spy(closure, backward=None, attention_mask=None, **kwargs):
        masks.append(attention_mask)
        return step(closure, backward=backward, attention_mask=attention_mask, **kwargs)

    adversary.step = spy
    return masks


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_with_other_methods_trains_to_the_hand_loops_weights(tmp_path, method):
    model, reference, plain = bert(), bert(), bert()
    initial = flat(model)
    adversary = METHODS[method](model)
    masks = masks_given_to_step(adversary) if isinstance(adversary, FreeLB) else []  # the batch's mask reaches it
    adversarial_trainer(model, adversary, tmp_path).train()

    hand_loop(reference, step_with(METHODS[method](reference)), divide=False)
    assert_same_training(model, reference, initial, f"AdversarialTrainer + {method} against the hand loop")
    hand_loop(plain, step_with(None), divide=False)
    applied = relative_difference(flat(model) - initial, flat(plain) - initial)
    assert applied > 1e-2, f"{method} changed the updates by only {applied:.3g} against plain training"
    if isinstance(adversary, FreeLB):
        assert len(masks) == ACCUM * STEPS
        for got, batch in zip(masks, micro_batches(), strict=True):
            assert got is not None and torch.equal(got, batch["attention_mask"])


def test_trainer_bf16_runs_the_adversarial_pass_under_autocast(tmp_path):
    model = bert()
    initial = flat(model)
    dtypes = []
    model.classifier.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    adversarial_trainer(model, FGM(model), tmp_path, bf16=True).train()
    assert dtypes == [torch.bfloat16] * (2 * ACCUM * STEPS), f"want 2 bf16 passes per micro-batch, got {dtypes}"
    weights = flat(model)
    assert torch.isfinite(weights).all()
    assert relative_difference(weights, initial) > 1e-4


def test_trainer_sends_every_pass_through_the_grad_scaler(tmp_path):
    # fp16 on CUDA backpropagates through the accelerator's GradScaler. accelerate makes none on CPU (fp16 there
    # trains in fp32), so this test installs a CPU GradScaler by hand: a power-of-two scale unscales exactly, so
    # the weights match the unscaled hand loop only if every backward was scaled once.
    model, reference = bert(), bert()
    initial = flat(model)
    trainer = adversarial_trainer(model, FGM(model), tmp_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaled = []
    scale = scaler.scale
    scaler.scale = lambda outputs: scaled.append(1) or scale(outputs)
    trainer.accelerator.scaler = scaler  # before train(): Trainer's optimizer is prepared with it there
    trainer.train()
    assert len(scaled) == 2 * ACCUM * STEPS, "every clean and adversarial backward goes through the scaler"
    assert scaler.get_scale() == 2.0**12, "no step was skipped for an overflow"

    hand_loop(reference, step_with(FGM(reference)), divide=False)
    assert_same_training(model, reference, initial, "AdversarialTrainer + GradScaler against the unscaled hand loop")


def test_trainer_refuses_a_missing_adversary_or_one_on_another_model(tmp_path):
    from fastadv.integrations.hf import AdversarialTrainer

    model = bert()
    with pytest.raises(TypeError, match="needs adversary="):
        AdversarialTrainer(model=model, args=training_args(tmp_path))
    with pytest.raises(TypeError, match="FGM, PGD, FreeLB, GradientPenalty, VAT, SMART or R3F, found Adam"):
        AdversarialTrainer(adversary=torch.optim.Adam(model.parameters()), model=model, args=training_args(tmp_path))
    with pytest.raises(ValueError, match="not the model this Trainer trains"):
        AdversarialTrainer(adversary=FGM(bert()), model=model, args=training_args(tmp_path))


# ------------------------------------------------------------ accelerate


def test_accelerate_loop_matches_the_plain_loop():
    from accelerate import Accelerator

    model, reference = bert(), bert()
    initial = flat(model)
    fgm = FGM(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    loader = torch.utils.data.DataLoader(Examples(), batch_size=MICRO, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    micro = 0
    for batch in loader:
        with accelerator.accumulate(model):
            fgm.step(lambda batch=batch: model(**batch).loss, backward=accelerator.backward)
            optimizer.step()  # applied, and zero_grad, only at the accumulation boundary
            optimizer.zero_grad()
        micro += 1
    assert micro == ACCUM * STEPS

    hand_loop(reference, step_with(FGM(reference)), divide=True)  # accelerator.backward divides by ACCUM
    update = relative_difference(flat(model) - initial, flat(reference) - initial)
    assert update <= 1e-6, f"accelerate loop against the plain loop: updates differ by {update:.3g}"


# ------------------------------------------------------------ Lightning


def test_lightning_manual_optimization_matches_the_plain_loop():
    import lightning

    from fastadv.integrations.lightning import adversarial_training_step

    class Classifier(lightning.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = model
            self.fgm = FGM(model)
            self.losses: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            loss = adversarial_training_step(self, self.fgm, lambda: self.model(**batch).loss)
            self.losses.append(loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=LR)

    model, reference = bert(), bert()
    initial = flat(model)
    module = Classifier(model)
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(Examples(), batch_size=MICRO, shuffle=False)
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS and len(module.losses) == STEPS

    # The plain loop: one optimizer step per micro-batch, as the module does.
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    fgm = FGM(reference)
    reference.train()
    for batch, logged in zip(micro_batches()[:STEPS], module.losses, strict=True):
        optimizer.zero_grad()
        loss = fgm.step(lambda batch=batch: reference(**batch).loss)
        optimizer.step()
        assert logged.item() == pytest.approx(loss.item(), rel=1e-6)
    assert_same_training(model, reference, initial, "Lightning + adversarial_training_step against the plain loop")


def test_lightning_helper_refuses_automatic_optimization_and_a_stray_mask():
    import lightning

    from fastadv.integrations.lightning import adversarial_training_step

    model = bert()
    module = lightning.LightningModule()
    batch = micro_batches()[0]
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        adversarial_training_step(module, FGM(model), lambda: model(**batch).loss)
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="attention_mask= is for FreeLB, VAT, SMART and R3F"):
        adversarial_training_step(module, FGM(model), lambda: model(**batch).loss, attention_mask=batch["input_ids"])


# ------------------------------------------------------------ VAT, SMART, R3F; the warm-up start

CONSISTENCY = {
    "vat": lambda model: VAT(model, epsilon=1.0, xi=0.3),
    "smart": lambda model: SMART(model, epsilon=0.05, step_size=0.02, noise_var=0.01),
    "r3f": lambda model: R3F(model, epsilon=0.3),
}


def counted_noise(monkeypatch) -> Callable[[], None]:
    """Replaces the methods' random draws with a sequence that restarts at each call of the function returned
    (Trainer and the hand loop draw from the global RNG differently, e.g. the DataLoader's seed)."""
    calls = [0]

    def noise(kind, ids, output):
        calls[0] += 1
        g = torch.Generator().manual_seed(calls[0])
        return torch.randn(output.shape, generator=g) if kind == "normal" else torch.rand(output.shape, generator=g)

    monkeypatch.setattr(consistency, "random_like", noise)
    return lambda: calls.__setitem__(0, 0)


@pytest.mark.parametrize("method", list(CONSISTENCY))
def test_trainer_with_vat_smart_r3f_trains_to_the_hand_loops_weights(tmp_path, monkeypatch, method):
    restart = counted_noise(monkeypatch)
    model, reference, plain = bert(), bert(), bert()
    initial = flat(model)
    adversary = CONSISTENCY[method](model)
    masks = masks_given_to_step(adversary)
    adversarial_trainer(model, adversary, tmp_path).train()
    restart()
    ref_adversary = CONSISTENCY[method](reference)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    reference.train()
    for i, batch in enumerate(micro_batches()):
        ref_adversary.step(lambda batch=batch: reference(**batch), attention_mask=batch["attention_mask"])
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            reference.zero_grad()
    assert_same_training(model, reference, initial, f"AdversarialTrainer + {method} against the hand loop")
    hand_loop(plain, step_with(None), divide=False)
    applied = relative_difference(flat(model) - initial, flat(plain) - initial)
    assert applied > 1e-3, f"{method} changed the updates by only {applied:.3g} against plain training"
    assert len(masks) == ACCUM * STEPS
    for got, batch in zip(masks, micro_batches(), strict=True):
        assert got is not None and torch.equal(got, batch["attention_mask"])


WARMUP_METHODS = {
    "fgm": lambda model: FGM(model),
    **METHODS,
    "vat": CONSISTENCY["vat"],
}


@pytest.mark.parametrize("method", list(WARMUP_METHODS))
def test_adversary_start_step_trains_the_first_steps_plainly_bitwise(tmp_path, method):
    from transformers import Trainer

    start = STEPS - 1
    model, plain = bert(), bert()
    adversary = WARMUP_METHODS[method](model)
    trainer = adversarial_trainer(model, adversary, tmp_path, max_steps=start)
    trainer.adversary_start_step = start
    trainer.train()
    Trainer(model=plain, args=training_args(tmp_path, max_steps=start), train_dataset=Examples()).train()
    for (name, got), want in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(got, want), f"{method}: {name} differs from plain training within the warm-up"


def test_adversary_start_step_then_runs_the_adversary(tmp_path):
    start = 1
    model, reference = bert(), bert()
    initial = flat(model)
    trainer = adversarial_trainer(model, FGM(model), tmp_path)
    trainer.adversary_start_step = start
    trainer.train()
    fgm, optimizer = FGM(reference), torch.optim.SGD(reference.parameters(), lr=LR)
    reference.train()
    for i, batch in enumerate(micro_batches()):
        closure = lambda batch=batch: reference(**batch).loss  # noqa: E731
        fgm.step(closure, enabled=i // ACCUM >= start)
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            reference.zero_grad()
    assert_same_training(model, reference, initial, "adversary_start_step=1 against the hand loop")
    always = bert()
    adversarial_trainer(always, FGM(always), tmp_path / "always").train()
    assert relative_difference(flat(model) - initial, flat(always) - initial) > 1e-4, "the warm-up changed nothing"


def test_adversary_start_step_is_checked(tmp_path):
    from fastadv.integrations.hf import AdversarialTrainer

    model = bert()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="adversary_start_step must be an int >= 0"):
            AdversarialTrainer(
                adversary=FGM(model), model=model, args=training_args(tmp_path), adversary_start_step=bad
            )


@pytest.mark.parametrize("method", list(WARMUP_METHODS))
def test_enabled_false_is_one_plain_forward_and_backward(method):
    model, plain = bert(), bert()
    adversary = WARMUP_METHODS[method](model)
    batch = micro_batches()[0]
    calls = []

    def closure():
        calls.append(1)
        out = model(**batch)
        return out if method == "vat" else out.loss

    loss = adversary.step(closure, enabled=False)
    want = plain(**batch).loss
    want.backward()
    assert len(calls) == 1
    assert torch.equal(loss, want.detach())
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_lightning_adversary_start_step_runs_plain_steps_first():
    import lightning

    from fastadv.integrations.lightning import adversarial_training_step

    start = 2

    class Classifier(lightning.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = model
            self.fgm = FGM(model)

        def training_step(self, batch, batch_idx):
            closure = lambda: self.model(**batch).loss  # noqa: E731
            return adversarial_training_step(self, self.fgm, closure, adversary_start_step=start)

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=LR)

    model, reference = bert(), bert()
    initial = flat(model)
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Classifier(model), torch.utils.data.DataLoader(Examples(), batch_size=MICRO, shuffle=False))
    optimizer, fgm = torch.optim.SGD(reference.parameters(), lr=LR), FGM(reference)
    reference.train()
    for i, batch in enumerate(micro_batches()[:STEPS]):
        optimizer.zero_grad()
        fgm.step(lambda batch=batch: reference(**batch).loss, enabled=i >= start)
        optimizer.step()
    assert_same_training(model, reference, initial, "Lightning with adversary_start_step against the plain loop")


# ------------------------------------------------------------ imports


def test_import_fastadv_imports_no_training_engine():
    code = (
        "import sys, fastadv, fastadv.integrations, fastadv.integrations.lightning\n"
        "engines = {'transformers', 'accelerate', 'lightning', 'pytorch_lightning'}\n"
        "loaded = sorted(engines & {name.split('.')[0] for name in sys.modules})\n"
        "assert not loaded, f'import fastadv imported {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_compute_loss_that_ignores_return_outputs_is_named_for_the_consistency_methods(tmp_path):
    """Issue 30, item 7: a user override that returns the loss alone crashed VAT, SMART and R3F with
    'iteration over a 0-d tensor'; FGM works with the same override."""
    from fastadv import VAT
    from fastadv.integrations.hf import AdversarialTrainer

    class LossOnly(AdversarialTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._adversarial_step_pending:  # the adversary's passes: the override users write
                return model(**inputs).loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = bert()
    trainer = LossOnly(adversary=VAT(model), model=model, args=training_args(tmp_path), train_dataset=Examples())
    with pytest.raises(TypeError, match=r"returned a tensor of shape \(\), not \(loss, outputs\)"):
        trainer.train()
    model = bert()
    trainer = LossOnly(adversary=FGM(model), model=model, args=training_args(tmp_path), train_dataset=Examples())
    trainer.train()
    assert trainer.state.global_step == STEPS


# ------------------------------------------------------------ carried state: SMART's teacher, skipped_steps


def smart_with_teacher(model: nn.Module) -> SMART:
    return SMART(model, epsilon=0.05, step_size=0.02, noise_var=0.01, proximal_weight=1.0, proximal_momentum=0.5)


def test_smarts_teacher_moves_once_per_optimizer_step_under_accumulation():
    # A plain loop, 2 micro-batches per optimizer step: the teacher is the weights' moving average over the
    # optimizer steps (each micro-batch after the first sees the weights it already moved to).
    model = bert()
    smart = smart_with_teacher(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected, moves = None, 0
    for i, batch in enumerate(micro_batches()):
        if i % ACCUM == 0:  # the first micro-batch of an optimizer step: the teacher moves, from the weights now
            weights = [p.detach().clone() for p in trainable]
            if expected is None:
                expected = weights
            else:
                expected = [torch.lerp(t, w, 0.5) for t, w in zip(expected, weights, strict=True)]
                moves += 1
        smart.step(lambda batch=batch: model(**batch), attention_mask=batch["attention_mask"])
        for mine, want in zip(smart._teacher.weights, expected, strict=True):
            torch.testing.assert_close(mine, want, rtol=0, atol=1e-7)
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            model.zero_grad()
    assert moves == len(micro_batches()) // ACCUM - 1 >= 2
    # Said outright: teacher_step=False holds it after an optimizer step, True moves it without one.
    held = [w.clone() for w in smart._teacher.weights]
    batch = micro_batches()[0]
    smart.step(lambda: model(**batch), teacher_step=False)
    assert all(torch.equal(a, b) for a, b in zip(held, smart._teacher.weights, strict=True))
    optimizer.step()
    smart.step(lambda: model(**batch), teacher_step=True)
    smart.step(lambda: model(**batch), teacher_step=True)
    assert not all(torch.equal(a, b) for a, b in zip(held, smart._teacher.weights, strict=True))
    with pytest.raises(TypeError, match="teacher_step"):
        smart.step(lambda: model(**batch), teacher_step="yes")


def test_trainer_moves_smarts_teacher_once_per_optimizer_step(tmp_path, monkeypatch):
    moves = []
    original = consistency.MomentumTeacher.update
    monkeypatch.setattr(consistency.MomentumTeacher, "update", lambda self, m: (moves.append(m), original(self, m)))
    model = bert()
    adversarial_trainer(model, smart_with_teacher(model), tmp_path).train()
    assert len(moves) == STEPS - 1, f"the teacher moved {len(moves)} times in {STEPS} optimizer steps of {ACCUM}"


@pytest.mark.parametrize("method", ["smart", "fgm"])
def test_a_resumed_trainer_carries_the_adversarys_state_bitwise(tmp_path, method):
    # 4 optimizer steps straight, against 2, a checkpoint, and 2 more resumed from it in a new Trainer.
    make = {"smart": smart_with_teacher, "fgm": lambda m: FGM(m)}[method]

    def run(output: str, resume: str | None) -> tuple:
        model = bert()
        adversary = make(model)
        if resume is None:
            adversary.load_state_dict({**adversary.state_dict(), "skipped_steps": 2})  # counted before: carried on
        trainer = adversarial_trainer(
            model, adversary, tmp_path / output, max_steps=4, save_strategy="steps", save_steps=2
        )
        trainer.train(resume_from_checkpoint=resume)
        return flat(model), adversary

    straight, straight_adversary = run("straight", None)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "fastadv_adversary.pt").is_file()
    resumed, resumed_adversary = run("resumed", str(checkpoint))
    assert torch.equal(resumed, straight), f"resumed weights differ by {relative_difference(resumed, straight):.3g}"
    assert resumed_adversary.skipped_steps == straight_adversary.skipped_steps == 2
    if method == "smart":
        assert all(
            torch.equal(a, b)
            for a, b in zip(resumed_adversary._teacher.weights, straight_adversary._teacher.weights, strict=True)
        )


def test_load_state_dict_refuses_what_it_cannot_carry():
    model = bert()
    smart = smart_with_teacher(model)
    with pytest.raises(ValueError, match="takes what its state_dict"):
        smart.load_state_dict({"skipped_steps": 0})
    with pytest.raises(ValueError, match="skipped_steps must be an int"):
        smart.load_state_dict({"skipped_steps": -1, "teacher": None})
    with pytest.raises(ValueError, match="other shapes"):
        smart.load_state_dict({"skipped_steps": 0, "teacher": [torch.zeros(3)]})
    plain = SMART(model)
    with pytest.raises(ValueError, match="proximal_weight=0"):
        plain.load_state_dict({"skipped_steps": 0, "teacher": [p.detach() for p in model.parameters()]})
    fgm = FGM(model)
    fgm.load_state_dict({"skipped_steps": 7})
    assert fgm.skipped_steps == 7 and fgm.state_dict() == {"skipped_steps": 7}


# ------------------------------------------------------------ an adversary on a Trainer already built, by name


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_make_adversarial_on_a_built_trainer_trains_as_the_adversarial_trainer_class(tmp_path, method):
    from transformers import Trainer

    from fastadv import build_adversary
    from fastadv.integrations.hf import AdversarialTrainingMixin, make_adversarial

    options = {"fgm": {"epsilon": "1.0"}, "pgd": {"epsilon": "1.0", "alpha": "0.3", "steps": "2"}}[method]
    model, reference = bert(), bert()
    trainer = Trainer(model=model, args=training_args(tmp_path / "a"), train_dataset=Examples())  # as a framework
    returned = make_adversarial(trainer, build_adversary(trainer.model, method, **options), adversary_start_step=1)
    assert returned is trainer and isinstance(trainer, AdversarialTrainingMixin)
    assert type(trainer).__name__ == "AdversarialTrainer" and trainer.adversary_start_step == 1
    trainer.train()
    adversary = {"fgm": lambda m: FGM(m, epsilon=1.0), "pgd": lambda m: PGD(m, epsilon=1.0, alpha=0.3, steps=2)}
    twin = adversarial_trainer(reference, adversary[method](reference), tmp_path / "b")
    twin.adversary_start_step = 1
    twin.train()
    assert torch.equal(flat(model), flat(reference)), "make_adversarial trained otherwise than AdversarialTrainer"


def test_make_adversarial_refuses_and_leaves_the_trainer_as_it_was(tmp_path):
    from transformers import Trainer

    from fastadv.integrations.hf import make_adversarial

    model = bert()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=Examples())
    with pytest.raises(ValueError, match="not the model this Trainer trains"):
        make_adversarial(trainer, FGM(bert()))
    with pytest.raises(ValueError, match="adversary_start_step must be an int"):
        make_adversarial(trainer, FGM(model), adversary_start_step=-1)
    assert type(trainer) is Trainer and "adversary" not in vars(trainer), "a refusal changed the Trainer"
    with pytest.raises(TypeError, match=r"takes a transformers\.Trainer instance, found BertForSequenceClassification"):
        make_adversarial(model, FGM(model))
    make_adversarial(trainer, FGM(model))
    with pytest.raises(ValueError, match="adversarial already"):
        make_adversarial(trainer, PGD(model))


def test_build_adversary_reads_names_and_options_as_a_config_gives_them():
    from fastadv import build_adversary

    model = bert()
    pgd = build_adversary(model, "PGD", epsilon="0.5", alpha="0.1", steps="4", target="weight")
    assert isinstance(pgd, PGD) and (pgd.epsilon, pgd.alpha, pgd.steps, pgd.target) == (0.5, 0.1, 4, "weight")
    assert build_adversary(model, "fgsm").norm == "sign" and build_adversary(model, "fgm", epsilon=2).epsilon == 2
    assert isinstance(build_adversary(model, "gp", epsilon="0.1"), GradientPenalty)
    assert isinstance(build_adversary(model, "gradient-penalty"), GradientPenalty)
    freelb = build_adversary(model, "freelb", adv_steps="2", keep_clean_loss="true")
    assert (freelb.adv_steps, freelb.keep_clean_loss) == (2, True)
    smart = build_adversary(model, "smart", proximal_weight="1", steps="2")
    assert (smart.proximal_weight, smart.steps) == (1.0, 2)
    assert isinstance(build_adversary(model, "vat", xi="0.2"), VAT) and isinstance(build_adversary(model, "r3f"), R3F)
    with pytest.raises(ValueError, match="no fastadv method is named 'fmg'"):
        build_adversary(model, "fmg")
    with pytest.raises(ValueError, match=r"no option 'eps': its options are epsilon=1\.0"):
        build_adversary(model, "pgd", eps=1.0)
    with pytest.raises(ValueError, match=r"option steps is an int \(default 3\), found '2\.5'"):
        build_adversary(model, "pgd", steps="2.5")
    with pytest.raises(ValueError, match="norm must be"):
        build_adversary(model, "fgm", norm="l3")


# ------------------------------------------------------------ config keys (axolotl's plugin)


def test_config_keys_make_a_built_trainer_adversarial_or_leave_it_plain(tmp_path):
    from transformers import Trainer

    from fastadv.integrations.from_config import make_adversarial_from_config

    # What axolotl's plugin gets after building its Trainer: the config (attribute access there) and the Trainer.
    class Config(dict):
        __getattr__ = dict.get

    model, reference, plain, plain_reference = bert(), bert(), bert(), bert()
    trainer = Trainer(model=model, args=training_args(tmp_path / "a"), train_dataset=Examples())
    config = Config(adversarial_method="pgd", adversarial_epsilon=1.0, adversarial_options={"alpha": 0.3, "steps": 2})
    assert make_adversarial_from_config(config, trainer) is trainer and type(trainer).__name__ == "AdversarialTrainer"
    trainer.train()
    adversarial_trainer(reference, PGD(reference, epsilon=1.0, alpha=0.3, steps=2), tmp_path / "b").train()
    assert torch.equal(flat(model), flat(reference)), "the config's PGD trained otherwise than AdversarialTrainer"

    untouched = Trainer(model=plain, args=training_args(tmp_path / "c"), train_dataset=Examples())
    assert make_adversarial_from_config(Config(), untouched) is None and type(untouched) is Trainer
    untouched.train()
    Trainer(model=plain_reference, args=training_args(tmp_path / "d"), train_dataset=Examples()).train()
    assert torch.equal(flat(plain), flat(plain_reference)), "a config without the keys did not train plainly"

    with pytest.raises(ValueError, match="sets adversarial_epsilon without adversarial_method"):
        make_adversarial_from_config({"adversarial_epsilon": 1.0}, untouched)
    with pytest.raises(ValueError, match="keep one"):
        make_adversarial_from_config(
            {"adversarial_method": "fgm", "adversarial_epsilon": 1.0, "adversarial_options": {"epsilon": 2.0}},
            untouched,
        )
    with pytest.raises(ValueError, match="no option 'alpha'"):
        make_adversarial_from_config({"adversarial_method": "fgm", "adversarial_options": {"alpha": 1}}, untouched)
    assert type(untouched) is Trainer

"""VAT, SMART and R3F against independent ``inputs_embeds`` implementations of the published algorithms.

Each reference takes the word-embedding output itself, adds the perturbation and feeds it back as
``inputs_embeds`` (the model adds the position embeddings once); its divergences are written with
``F.kl_div``. The fastadv step and the reference draw their random numbers in the same order, so in fp32
the parameter gradients agree to rounding (1e-5 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import parameter_gradients, relative_difference
from models import VOCAB, tiny_bert
from torch import nn

from fastadv import R3F, SMART, VAT
from fastadv.methods.consistency import (
    kl_divergence,
    kl_of_log_probabilities,
    log_probabilities,
    loss_and_logits,
    symmetric_kl_of_log_probabilities,
)


def tiny_llama(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def batch(model_kind: str, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    ids[0, 2] = ids[0, 5] = ids[1, 7]  # repeated ids
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded sequence
    ids[1, 8:] = 0
    labels = torch.randint(0, 3, (3,), generator=g) if model_kind == "bert" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(model_kind: str) -> nn.Module:
    return tiny_bert() if model_kind == "bert" else tiny_llama()


def ref_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(p || q) per position with F.kl_div (input log q, target log p), the mean over the masked positions."""
    per = F.kl_div(
        F.log_softmax(q_logits.float(), -1), F.log_softmax(p_logits.float(), -1), reduction="none", log_target=True
    ).sum(-1)
    if per.dim() == 1 or mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum()


def embeds_forward(model: nn.Module, b: dict, delta: torch.Tensor | None):
    e = model.get_input_embeddings()(b["input_ids"])
    e = e if delta is None else e + delta
    return model(inputs_embeds=e, attention_mask=b["attention_mask"], labels=b["labels"])


def per_sequence_unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]


def reference_r3f(model, b, epsilon, weight, noise) -> torch.Tensor:
    out = embeds_forward(model, b, None)
    shape = (*b["input_ids"].shape, model.config.hidden_size)
    if noise == "normal":
        n = torch.randn(shape) * epsilon
    else:
        n = torch.empty(shape).uniform_(-epsilon, epsilon)
    noisy = embeds_forward(model, b, n).logits
    mask = b["attention_mask"]
    sym = ref_kl(out.logits, noisy, mask) + ref_kl(noisy, out.logits, mask)
    (out.loss + weight * sym).backward()
    return out.loss.detach()


def reference_vat(model, b, epsilon, xi, iterations, weight) -> torch.Tensor:
    out = embeds_forward(model, b, None)
    mask = b["attention_mask"]
    m = mask[..., None].float()
    d = torch.randn((*b["input_ids"].shape, model.config.hidden_size))
    r = xi * per_sequence_unit(d * m)
    for k in range(iterations):
        r = r.detach().requires_grad_()
        kl = ref_kl(out.logits.detach(), embeds_forward(model, b, r).logits, mask)
        (g,) = torch.autograd.grad(kl, r)
        r = (epsilon if k == iterations - 1 else xi) * per_sequence_unit(g * m)
    adv = embeds_forward(model, b, r.detach()).logits
    (out.loss + weight * ref_kl(out.logits.detach(), adv, mask)).backward()
    return out.loss.detach()


def reference_smart(model, b, epsilon, step_size, noise_var, steps, norm, weight) -> torch.Tensor:
    out = embeds_forward(model, b, None)
    mask = b["attention_mask"]
    noise = torch.randn((*b["input_ids"].shape, model.config.hidden_size)) * noise_var
    for _ in range(steps):
        noise = noise.detach().requires_grad_()
        kl = ref_kl(out.logits.detach(), embeds_forward(model, b, noise).logits, mask)
        (g,) = torch.autograd.grad(kl, noise)
        if norm == "l2":
            moved = noise + step_size * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # a padded token: g = 0
            scale = (epsilon / moved.norm(dim=-1, keepdim=True)).clamp(max=1.0)
            noise = moved * scale
        else:
            moved = noise + step_size * g / g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
            noise = moved.clamp(-epsilon, epsilon)
    adv = embeds_forward(model, b, noise.detach()).logits
    sym = ref_kl(out.logits.detach(), adv, mask) + ref_kl(adv.detach(), out.logits, mask)
    (out.loss + weight * sym).backward()
    return out.loss.detach()


CASES = {
    "r3f_uniform": (lambda m: R3F(m, epsilon=0.3, weight=2.0), lambda m, b: reference_r3f(m, b, 0.3, 2.0, "uniform")),
    "r3f_normal": (
        lambda m: R3F(m, epsilon=0.2, weight=1.5, noise="normal"),
        lambda m, b: reference_r3f(m, b, 0.2, 1.5, "normal"),
    ),
    "vat": (lambda m: VAT(m, epsilon=2.0, xi=0.5), lambda m, b: reference_vat(m, b, 2.0, 0.5, 1, 1.0)),
    "vat_k2": (
        lambda m: VAT(m, epsilon=1.5, xi=0.3, power_iterations=2, weight=3.0),
        lambda m, b: reference_vat(m, b, 1.5, 0.3, 2, 3.0),
    ),
    "smart_linf": (
        lambda m: SMART(m, epsilon=0.05, step_size=0.02, noise_var=0.01, steps=2, weight=2.0),
        lambda m, b: reference_smart(m, b, 0.05, 0.02, 0.01, 2, "linf", 2.0),
    ),
    "smart_l2": (
        lambda m: SMART(m, epsilon=0.3, step_size=0.2, noise_var=0.05, norm="l2"),
        lambda m, b: reference_smart(m, b, 0.3, 0.2, 0.05, 1, "l2", 1.0),
    ),
}


@pytest.mark.parametrize("model_kind", ["bert", "llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_method_equals_its_inputs_embeds_reference(case, model_kind):
    make, reference = CASES[case]
    model = build(model_kind)
    twin = copy.deepcopy(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    b = batch(model_kind)
    adversary = make(model)
    torch.manual_seed(7)
    loss = adversary.step(lambda: model(**b), attention_mask=b["attention_mask"])
    torch.manual_seed(7)
    want_loss = reference(twin, b)
    got, want = parameter_gradients(model), parameter_gradients(twin)
    assert relative_difference(got, want) <= 1e-5, f"{case}: gradients differ by {relative_difference(got, want):.3g}"
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    # The term changed the gradient: the task loss alone would give another one.
    plain = copy.deepcopy(twin)
    plain.zero_grad()
    plain(**b).loss.backward()
    assert relative_difference(parameter_gradients(plain), want) > 1e-4, f"{case}: the term added nothing"
    for k, v in model.state_dict().items():  # the weights were never written
        assert torch.equal(v, start[k]), k
    assert adversary.skipped_steps == 0


@pytest.mark.parametrize("case", list(CASES))
def test_a_frozen_table_gets_the_term_through_its_output(case):
    make, reference = CASES[case]
    model = tiny_bert()
    model.get_input_embeddings().weight.requires_grad_(False)
    twin = copy.deepcopy(model)
    b = batch("bert")
    adversary = make(model)
    torch.manual_seed(7)
    adversary.step(lambda: model(**b), attention_mask=b["attention_mask"])
    torch.manual_seed(7)
    reference(twin, b)
    assert model.get_input_embeddings().weight.grad is None
    assert relative_difference(parameter_gradients(model), parameter_gradients(twin)) <= 1e-5


@pytest.mark.parametrize("form", ["pair", "mapping", "logits_only"])
def test_the_closure_may_return_a_pair_a_mapping_or_the_logits(form):
    model = tiny_bert()
    b = batch("bert")
    if form == "pair":  # Trainer.compute_loss(..., return_outputs=True)
        closure = lambda: (lambda out: (out.loss, out))(model(**b))  # noqa: E731
    elif form == "mapping":
        closure = lambda: dict(model(**b))  # noqa: E731
    else:
        closure = lambda: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # noqa: E731
    r3f = R3F(model, epsilon=0.3)
    torch.manual_seed(0)
    returned = r3f.step(closure)
    grads = parameter_gradients(model)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    clean = model(**b)
    if form == "logits_only":  # no task loss: the term alone, which is what step returns
        assert returned > 0 and not torch.isclose(returned, clean.loss.detach())
    else:
        torch.testing.assert_close(returned, clean.loss.detach())


def test_a_loss_only_closure_is_refused_with_what_to_return():
    model = tiny_bert()
    b = batch("bert")
    for method in (R3F(model), VAT(model), SMART(model)):
        with pytest.raises(TypeError, match="need the logits"):
            method.step(lambda: model(**b).loss)
        assert all(p.grad is None for p in model.parameters()), "a refused step wrote a gradient"
        method.remove_hooks()


def test_kl_divergence_masks_token_positions_and_averages_classification_rows():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    per = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q, mask), per[mask.bool()].mean())
    torch.testing.assert_close(kl_divergence(p[:, 0], q[:, 0]), per[:, 0].mean())
    assert kl_divergence(p, p, mask).abs() < 1e-6


def test_symmetric_kl_is_the_sum_of_both_divergences_with_their_gradients():
    # R3F's term and SMART's proximal term take KL(p || q) + KL(q || p) as one sum: the same value and the same
    # gradient to both sides, masked or not, per token or per row.
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1]])
    for shape, m in (((2, 5, 7), mask), ((2, 5, 7), None), ((3, 4), None)):
        p = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
        q = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
        lp, lq = log_probabilities(p).double(), log_probabilities(q).double()
        both = kl_of_log_probabilities(lp, lq, m) + kl_of_log_probabilities(lq, lp, m)
        one = symmetric_kl_of_log_probabilities(lp, lq, m)
        torch.testing.assert_close(one, both)
        expected = torch.autograd.grad(both, (p, q), retain_graph=True)
        torch.testing.assert_close(torch.autograd.grad(one, (p, q)), expected)
        assert one > 0.1, "distinct distributions must have a positive divergence"


def test_loss_and_logits_reads_model_outputs():
    model = tiny_bert()
    b = batch("bert")
    out = model(**b)
    loss, logits = loss_and_logits(out)
    assert loss is out.loss and logits is out.logits
    loss, logits = loss_and_logits((out.loss, out.logits))
    assert loss is out.loss and logits is out.logits
    with pytest.raises(TypeError, match="without 'logits'"):
        loss_and_logits({"loss": out.loss})


@pytest.mark.parametrize("cls", [R3F, VAT, SMART])
def test_enabled_false_is_one_plain_forward_and_backward(cls):
    model = tiny_bert()
    twin = copy.deepcopy(model)
    b = batch("bert")
    calls = []

    def closure():
        calls.append(1)
        return model(**b)

    loss = cls(model).step(closure, enabled=False)
    twin(**b).loss.backward()
    assert len(calls) == 1
    assert torch.equal(parameter_gradients(model), parameter_gradients(twin))
    torch.testing.assert_close(loss, twin(**b).loss.detach(), rtol=0, atol=0)


def test_a_huge_noise_whose_pass_overflows_leaves_grad_finite_and_is_counted():
    model = tiny_bert()
    b = batch("bert")
    r3f = R3F(model, epsilon=1e38, noise="normal")
    torch.manual_seed(0)
    r3f.step(lambda: model(**b))
    assert torch.isfinite(parameter_gradients(model)).all()
    assert r3f.skipped_steps == 1


@pytest.mark.parametrize("case", ["r3f_uniform", "vat", "smart_linf"])
def test_the_table_gradient_comes_as_rows_with_torchs_dense_numbers(case, monkeypatch):
    """The step's backward runs through two lookups of the table: fastadv gives the table a zero .grad first, so
    each adds its rows (no V x d gradient per lookup, no V x d sum); the numbers are torch's dense backward's."""
    import fastadv.targets.row_gradients as row_gradients

    make, _ = CASES[case]
    b = batch("bert")
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FASTADV_ROW_GRADIENTS", flag)
        model = tiny_bert()
        adversary = make(model)
        lookups = []
        original = row_gradients.row_gradient_lookup
        spy = lambda *a, o=original, seen=lookups, **k: (seen.append(1), o(*a, **k))[1]  # noqa: E731
        monkeypatch.setattr(row_gradients, "row_gradient_lookup", spy)
        torch.manual_seed(7)
        adversary.step(lambda model=model: model(**b), attention_mask=b["attention_mask"])
        monkeypatch.setattr(row_gradients, "row_gradient_lookup", original)
        # The clean and the perturbed forwards' lookups at least (VAT's and SMART's inner ones too, whose gradient
        # goes to the perturbation alone).
        lookups_wanted = len(lookups) == 0 if flag == "0" else len(lookups) >= 2
        assert lookups_wanted, f"FASTADV_ROW_GRADIENTS={flag}: {len(lookups)} row lookups"
        grads[flag] = parameter_gradients(model)
    assert torch.equal(grads["0"], grads["1"])


def test_a_failed_step_leaves_the_table_without_a_gradient():
    model = tiny_bert()
    b = batch("bert")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the second forward failed")
        return model(**b)

    with pytest.raises(RuntimeError, match="second forward"):
        R3F(model).step(closure)
    assert model.get_input_embeddings().weight.grad is None


# ---------------------------------------------------------------- SMART's Bregman proximal point

PROXIMAL = dict(epsilon=0.05, step_size=0.02, noise_var=0.01, steps=1, weight=1.5)


def reference_smart_proximal(model, teacher, b, mu) -> None:
    """SMART's step plus mu * symmetric KL(p_teacher, p) on the clean inputs, the teacher a deepcopy of the model
    whose weights the caller moves."""
    with torch.no_grad():
        teacher_logits = embeds_forward(teacher, b, None).logits
    out = embeds_forward(model, b, None)
    mask = b["attention_mask"]
    noise = torch.randn((*b["input_ids"].shape, model.config.hidden_size)) * PROXIMAL["noise_var"]
    noise.requires_grad_()
    kl = ref_kl(out.logits.detach(), embeds_forward(model, b, noise).logits, mask)
    (g,) = torch.autograd.grad(kl, noise)
    moved = noise + PROXIMAL["step_size"] * g / g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    adv = embeds_forward(model, b, moved.clamp(-PROXIMAL["epsilon"], PROXIMAL["epsilon"]).detach()).logits
    sym = ref_kl(out.logits.detach(), adv, mask) + ref_kl(adv.detach(), out.logits, mask)
    bregman = ref_kl(teacher_logits, out.logits, mask) + ref_kl(out.logits, teacher_logits, mask)
    (out.loss + PROXIMAL["weight"] * sym + mu * bregman).backward()


@pytest.mark.parametrize("model_kind", ["bert", "llama"])
def test_smart_proximal_point_trains_as_a_momentum_teacher_reference(model_kind):
    mu, beta, steps = 2.0, 0.6, 4
    model = build(model_kind)
    twin, teacher = copy.deepcopy(model), copy.deepcopy(model)
    smart = SMART(model, **PROXIMAL, proximal_weight=mu, proximal_momentum=beta)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin))
    own = [p.data_ptr() for p in model.parameters()]
    for step in range(steps):
        b = batch(model_kind, seed=step)
        torch.manual_seed(step)
        smart.step(lambda b=b: model(**b), attention_mask=b["attention_mask"])
        if step > 0:  # the teacher follows the weights the last optimizer step gave
            with torch.no_grad():
                for t, p in zip(teacher.parameters(), twin.parameters(), strict=True):
                    t.mul_(beta).add_(p, alpha=1 - beta)
        torch.manual_seed(step)
        reference_smart_proximal(twin, teacher, b, mu)
        difference = relative_difference(parameter_gradients(model), parameter_gradients(twin))
        assert difference <= 1e-5, f"step {step}: gradients differ by {difference:.3g}"
        opt.step(), twin_opt.step()
        opt.zero_grad(), twin_opt.zero_grad()
    assert [p.data_ptr() for p in model.parameters()] == own, "the model was left on other tensors"
    # The proximal term moved the training: SMART without it ends elsewhere.
    alone, start = build(model_kind), build(model_kind)
    smart_alone = SMART(alone, **PROXIMAL)
    alone_opt = torch.optim.SGD(alone.parameters(), lr=0.5)
    for step in range(steps):
        b = batch(model_kind, seed=step)
        torch.manual_seed(step)
        smart_alone.step(lambda b=b: alone(**b), attention_mask=b["attention_mask"])
        alone_opt.step()
        alone_opt.zero_grad()
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    moved = relative_difference(flat(model) - flat(start), flat(alone) - flat(start))
    assert moved > 1e-3, f"the proximal term changed the update by {moved:.3g} only"


def test_smart_proximal_point_is_zero_at_the_first_step_and_frozen_weights_are_not_copied():
    model = tiny_bert()
    model.get_input_embeddings().weight.requires_grad_(False)
    twin = copy.deepcopy(model)
    b = batch("bert")
    smart = SMART(model, **PROXIMAL, proximal_weight=3.0)
    torch.manual_seed(0)
    smart.step(lambda: model(**b), attention_mask=b["attention_mask"])
    torch.manual_seed(0)
    SMART(twin, **PROXIMAL).step(lambda: twin(**b), attention_mask=b["attention_mask"])
    # The teacher is the model at the first step: a divergence at its minimum, whose gradient is zero.
    assert relative_difference(parameter_gradients(model), parameter_gradients(twin)) <= 1e-6
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(smart._teacher.weights) == len(trainable)
    assert sum(w.numel() for w in smart._teacher.weights) == sum(p.numel() for p in trainable)


def test_smart_teacher_forward_that_raises_leaves_the_model_on_its_own_weights():
    model = tiny_bert()
    b = batch("bert")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    own = [p.data_ptr() for p in model.parameters()]
    smart = SMART(model, **PROXIMAL, proximal_weight=1.0)
    smart.step(lambda: model(**b), attention_mask=b["attention_mask"])  # the teacher exists
    with torch.no_grad():
        for w in smart._teacher.weights:
            w.add_(1.0)  # the teacher now differs from the model

    def closure():
        raise RuntimeError("the data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        smart.step(closure)
    assert [p.data_ptr() for p in model.parameters()] == own
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_smart_proximal_point_refuses_sharded_parameters_and_a_bad_momentum():
    model = tiny_bert()
    b = batch("bert")
    # As DeepSpeed ZeRO-3 marks its partitioned parameters; not the table, whose engine check (once deepspeed is
    # imported, e.g. by an earlier Trainer test) would refuse the step before the teacher is made.
    model.classifier.weight.ds_id = 0
    with pytest.raises(NotImplementedError, match="proximal_weight=0"):
        SMART(model, proximal_weight=1.0).step(lambda: model(**b))
    with pytest.raises(ValueError, match=r"proximal_momentum must be in \[0, 1\)"):
        SMART(model, proximal_weight=1.0, proximal_momentum=1.0)


def test_bad_arguments_say_what_was_found():
    model = tiny_bert()
    with pytest.raises(ValueError, match="noise must be"):
        R3F(model, noise="gaussian")
    with pytest.raises(ValueError, match="power_iterations must be an int >= 1"):
        VAT(model, power_iterations=0)
    with pytest.raises(ValueError, match="norm must be"):
        SMART(model, norm="l1")
    with pytest.raises(ValueError, match="epsilon must be finite"):
        R3F(model, epsilon=float("nan"))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        VAT("model")


AMP_METHODS = {
    "vat": lambda m: VAT(m, epsilon=1.0, xi=0.3),
    "smart": lambda m: SMART(m, epsilon=0.05, step_size=0.02, noise_var=0.01),
    "r3f": lambda m: R3F(m, epsilon=0.1),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", list(AMP_METHODS))
def test_autocast_training_with_the_scaler_stays_finite_and_moves(dtype, method):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    adversary = AMP_METHODS[method](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=dtype == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = batch("bert")
    seen = []

    def closure():
        with torch.autocast("cpu", dtype=dtype):
            out = model(**b)
        seen.append(out.logits.dtype)
        return out

    for _ in range(3):
        adversary.step(
            closure,
            backward=lambda loss: scaler.scale(loss).backward(),
            attention_mask=b["attention_mask"],
            scaler=scaler,
        )
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert set(seen) == {dtype}, "the passes did not run under autocast"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)), "nothing trained"


@pytest.mark.parametrize("method", list(AMP_METHODS))
def test_an_overflowing_fp16_step_is_left_to_the_scaler_and_never_reaches_the_weights(method):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    adversary = AMP_METHODS[method](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16 gradients overflow at this scale
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = batch("bert")

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return model(**b)

    adversary.step(closure, backward=lambda loss: scaler.scale(loss).backward(), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**100, "the scaler saw no overflow: the test proves nothing"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert adversary.skipped_steps == 1


def test_a_scaled_inner_pass_gives_the_same_perturbation():
    """The ascent normalizes its gradient: the scaler's factor changes nothing but underflow."""
    grads = []
    for scale in (None, 2.0**10):
        model = tiny_bert()
        b = batch("bert")
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        torch.manual_seed(0)
        VAT(model, epsilon=1.0, xi=0.3).step(lambda model=model, b=b: model(**b), scaler=scaler)
        grads.append(parameter_gradients(model))
    assert relative_difference(grads[1], grads[0]) <= 1e-5

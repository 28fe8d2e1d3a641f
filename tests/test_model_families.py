"""Every method's default call on each model family transformers builds, against independent references.

Each family is built tiny from its config with random weights (nothing downloaded, dropout 0). For
every method in its default call (``FGM(model)``, ``PGD(model)`` through ``pgd.step`` and through the
snippet's calls, ``FreeLB(model).step``, ``GradientPenalty(model).step``) the test checks that

1. every parameter is bitwise what it was before the passes (no optimizer step is taken);
2. the parameter gradients after the passes equal an independent reference's, fp32, to 1e-5
   relative, parameter by parameter (a tied weight's against the sum of its untied copies'):
   - FGM and PGD: the copied snippets (``fastadv.snippets``) in weight mode on an untied copy of the
     model (a tied output projection given its own weight, a frozen table unfrozen), called with
     emb_name = the table's parameter name;
   - FreeLB and the gradient penalty: the published algorithms written here on the raw lookups
     ``weight[ids]`` of every module that looks the table up, each module's forward replaced for the
     passes (the scale of Gemma's and BART's scaled embeddings applied after the perturbation);
3. every lookup of the input table (T5, BART, mBART, Pegasus, Marian: the encoder's and the
   decoder's) is perturbed in each adversarial pass, seen by a forward hook of the test's own;
4. the gradients differ from those of the same passes unperturbed by over 100x the tolerance, so the
   comparison can fail; and target='auto' picks output mode exactly for the tied and frozen tables.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import transformers
from conftest import DEVICE, relative_difference
from torch import nn

from fastadv import FGM, PGD, FreeLB, GradientPenalty
from fastadv.snippets import SnippetFGM, SnippetPGD, pgd_snippet_step

VOCAB = 113
TOLERANCE = 1e-5
NOISE_FLOOR = 1e-4  # of the whole gradient's norm: see gradient_differences
METHODS = ("fgm", "pgd-step", "pgd-calls", "freelb", "gp")
PGD_STEPS = 3  # PGD's default K, which the snippet's loop below repeats
FREELB_STEPS, FREELB_LR = 3, 0.1  # FreeLB's defaults (no random start, no bound, l2)
GP_EPSILON = 1.0  # GradientPenalty's default

ENCODER = dict(
    vocab_size=VOCAB, hidden_size=36, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
    max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=40, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
SEQ2SEQ = dict(
    vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0,
    attention_dropout=0.0, activation_dropout=0.0,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the families


def _from_config(model: str, config: str, **settings: object) -> Callable[[], nn.Module]:
    """A builder of ``transformers.<model>(transformers.<config>(**settings))``, imported when built."""
    return lambda: getattr(transformers, model)(getattr(transformers, config)(**settings))


_bert = _from_config("BertForSequenceClassification", "BertConfig", **ENCODER, pad_token_id=0)
_roberta = _from_config("RobertaForSequenceClassification", "RobertaConfig", **ENCODER, pad_token_id=1)
_xlm_roberta = _from_config("XLMRobertaForSequenceClassification", "XLMRobertaConfig", **ENCODER, pad_token_id=1)
_albert = _from_config(
    "AlbertForSequenceClassification", "AlbertConfig", **ENCODER, embedding_size=20, classifier_dropout_prob=0.0,
    pad_token_id=0,
)  # fmt: skip
_deberta_v2 = _from_config("DebertaV2ForSequenceClassification", "DebertaV2Config", **ENCODER, pad_token_id=0)
_electra = _from_config(
    "ElectraForSequenceClassification", "ElectraConfig", **ENCODER, embedding_size=20, pad_token_id=0
)
_distilbert = _from_config(
    "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=36, n_layers=2, n_heads=4,
    hidden_dim=40, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    num_labels=3, pad_token_id=0,
)  # fmt: skip
_gpt2 = _from_config(
    "GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
_qwen2 = _from_config("Qwen2ForCausalLM", "Qwen2Config", **DECODER, tie_word_embeddings=False)
_mistral = _from_config("MistralForCausalLM", "MistralConfig", **DECODER)
_bart = _from_config("BartForConditionalGeneration", "BartConfig", **SEQ2SEQ, scale_embedding=True, pad_token_id=1)
_mbart = _from_config("MBartForConditionalGeneration", "MBartConfig", **SEQ2SEQ, pad_token_id=1)
_pegasus = _from_config("PegasusForConditionalGeneration", "PegasusConfig", **SEQ2SEQ, pad_token_id=0)
_marian = _from_config(
    "MarianMTModel", "MarianConfig", **SEQ2SEQ, pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1
)
_gemma = _from_config("GemmaForCausalLM", "GemmaConfig", **DECODER, head_dim=8)
_gemma2 = _from_config("Gemma2ForCausalLM", "Gemma2Config", **DECODER, head_dim=8)
_gemma3 = _from_config("Gemma3ForCausalLM", "Gemma3TextConfig", **DECODER, head_dim=8)


def _llama(tied: bool = False) -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, tie_word_embeddings=tied))


def _lora_llama(modules_to_save: list[str] | None = None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B random, not zero, so that A has a gradient to compare too.
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save,
        init_lora_weights=False,
    )  # fmt: skip
    return get_peft_model(_llama(), config)


def _t5(own_head: bool = False) -> nn.Module:
    """T5 (transformers 5 always ties its lm_head to the shared table). own_head: T5 v1.1 style (gated GELU,
    no decoder output scaling), the lm_head given its own weight: a trainable table that two modules look
    up, tied to nothing, so target='auto' perturbs its weight rows."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu" if own_head else "relu",
        tie_word_embeddings=not own_head,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)
    if own_head:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


@dataclass(frozen=True)
class Family:
    """A model family: how to build it, how to feed it, and which modules look its input table up.

    ``lookups`` is the test's own list (not fastadv's): the references perturb these modules' lookups.
    ``output_mode``: target='auto' must perturb the lookups' outputs (tied or frozen table), not weight rows.
    """

    build: Callable[[], nn.Module]
    kind: str  # "classifier", "causal" or "seq2seq": the batch and the loss
    lookups: tuple[str, ...]
    output_mode: bool
    pad: int = 0


_ENC_DEC = ("encoder.embed_tokens", "decoder.embed_tokens")
_BART_LIKE = ("model.encoder.embed_tokens", "model.decoder.embed_tokens")
_PEFT_LLAMA = "base_model.model.model.embed_tokens"

FAMILIES = {
    "bert": Family(_bert, "classifier", ("bert.embeddings.word_embeddings",), False),
    "roberta": Family(_roberta, "classifier", ("roberta.embeddings.word_embeddings",), False, pad=1),
    "xlm-roberta": Family(_xlm_roberta, "classifier", ("roberta.embeddings.word_embeddings",), False, pad=1),
    "albert": Family(_albert, "classifier", ("albert.embeddings.word_embeddings",), False),
    "deberta-v2": Family(_deberta_v2, "classifier", ("deberta.embeddings.word_embeddings",), False),
    "electra": Family(_electra, "classifier", ("electra.embeddings.word_embeddings",), False),
    "distilbert": Family(_distilbert, "classifier", ("distilbert.embeddings.word_embeddings",), False),
    "llama": Family(_llama, "causal", ("model.embed_tokens",), False),
    "qwen2": Family(_qwen2, "causal", ("model.embed_tokens",), False),
    "mistral": Family(_mistral, "causal", ("model.embed_tokens",), False),
    "gpt2": Family(_gpt2, "causal", ("transformer.wte",), True),
    "llama-tied": Family(functools.partial(_llama, tied=True), "causal", ("model.embed_tokens",), True),
    "llama-lora": Family(_lora_llama, "causal", (_PEFT_LLAMA,), True),
    "llama-lora-save-embed": Family(
        functools.partial(_lora_llama, ["embed_tokens"]), "causal", (f"{_PEFT_LLAMA}.modules_to_save.default",), False
    ),
    "t5": Family(_t5, "seq2seq", _ENC_DEC, True),
    "t5-own-head": Family(functools.partial(_t5, own_head=True), "seq2seq", _ENC_DEC, False),
    "bart": Family(_bart, "seq2seq", _BART_LIKE, True, pad=1),
    "mbart": Family(_mbart, "seq2seq", _BART_LIKE, True, pad=1),
    "pegasus": Family(_pegasus, "seq2seq", _BART_LIKE, True),
    "marian": Family(_marian, "seq2seq", _BART_LIKE, True, pad=VOCAB - 1),
    "gemma": Family(_gemma, "causal", ("model.embed_tokens",), True),
    "gemma2": Family(_gemma2, "causal", ("model.embed_tokens",), True),
    "gemma3": Family(_gemma3, "causal", ("model.embed_tokens",), True),
}


@functools.cache
def _pristine(family: str) -> nn.Module:
    """The family's model, built once; never run, hooked or trained: tests take deep copies of it."""
    torch.manual_seed(0)
    model = FAMILIES[family].build().to(DEVICE).train()
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p != 0]
    assert not dropouts, f"{family} has dropout {dropouts}: runs could not be compared"
    return model


def model_of(family: str) -> nn.Module:
    """A fresh copy of the family's model (its own parameters, no hooks)."""
    return copy.deepcopy(_pristine(family))


def batch_of(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """The model's keyword arguments: repeated ids, right padding with its attention mask, labels.

    Seq2seq targets draw from the same ids as the source, so the encoder's and the decoder's lookups
    share rows of the table.
    """
    spec = FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (3, 11), generator=gen)
    ids[:, -2:] = spec.pad
    ids[2, -4:] = spec.pad
    batch = {"input_ids": ids, "attention_mask": (ids != spec.pad).long()}
    if spec.kind == "classifier":
        batch["labels"] = torch.randint(0, 3, (3,), generator=gen)
    elif spec.kind == "causal":
        batch["labels"] = ids.masked_fill(ids == spec.pad, -100)
    else:
        labels = torch.randint(3, 40, (3, 7), generator=gen)
        labels[0, -2:] = -100  # shifted right, the decoder's input holds the padding id there
        batch["labels"] = labels
    return {k: v.to(DEVICE) for k, v in batch.items()}


def closure_of(model: nn.Module, batch: dict[str, torch.Tensor], losses: list | None = None) -> Callable:
    """The loss of one forward pass; each pass's loss is appended to ``losses``."""

    def closure() -> torch.Tensor:
        loss = model(**batch).loss
        if losses is not None:
            losses.append(loss.detach())
        return loss

    return closure


# ---------------------------------------------------------------- fastadv's calls, and the snippets' loops


def fgm_loop(adversary, closure: Callable, **names) -> None:
    """The FGM loop every script has (the snippet's calls); no optimizer step."""
    closure().backward()
    adversary.attack(**names)
    closure().backward()
    adversary.restore(**names)


def build_method(method: str, model: nn.Module):
    """The method in its default call."""
    return {"fgm": FGM, "pgd-step": PGD, "pgd-calls": PGD, "freelb": FreeLB, "gp": GradientPenalty}[method](model)


def run_method(method: str, adversary, model: nn.Module, closure: Callable) -> None:
    if method == "fgm":
        fgm_loop(adversary, closure)
    elif method == "pgd-calls":
        pgd_snippet_step(model, adversary, closure, PGD_STEPS)
    else:  # pgd-step, freelb, gp
        adversary.step(closure)


# ---------------------------------------------------------------- independent references


def untied_copy(model: nn.Module, lookup: str) -> tuple[nn.Module, str]:
    """A deep copy whose input table serves its lookups only (an output projection tied to it gets its
    own copy of the weight), trainable; and the table's name as ``named_parameters()`` lists it."""
    model = copy.deepcopy(model)
    table = model.get_submodule(lookup).weight
    for module in model.modules():
        if not isinstance(module, nn.Embedding) and module._parameters.get("weight") is table:
            module.weight = nn.Parameter(table.detach().clone())
    table.requires_grad_(True)
    (name,) = [n for n, p in model.named_parameters() if p is table]
    return model, name


def lookup_scale(module: nn.Embedding) -> float | torch.Tensor:
    """The factor the module applies to its raw lookup (Gemma's and BART's scaled embeddings), as it applies it."""
    scale = getattr(module, "embed_scale", 1.0)
    return scale.to(module.weight.dtype) if isinstance(scale, torch.Tensor) else scale


@contextmanager
def replaced_lookups(model: nn.Module, names: tuple[str, ...], lookup: Callable) -> Iterator[None]:
    """Inside the block, module ``names[i]`` computes ``lookup(i, raw, scale)`` from its raw lookup
    ``weight[ids]``: its forward is replaced, so nothing of fastadv's is involved. Checks first that
    ``raw * scale`` is what the module's own forward returns, bit for bit."""
    modules = [model.get_submodule(name) for name in names]

    def forward(index: int, module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        raw = nn.Embedding.forward(module, ids)
        with torch.no_grad():
            assert torch.equal(raw * lookup_scale(module), type(module).forward(module, ids)), names[index]
        return lookup(index, raw, lookup_scale(module))

    for index, module in enumerate(modules):
        module.forward = functools.partial(forward, index, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def reference_freelb(model: nn.Module, names: tuple[str, ...], closure: Callable) -> None:
    """Published FreeLB (default: no random start, no bound, l2), one delta per lookup on the raw lookup."""
    deltas: list[torch.Tensor | None] = [None] * len(names)

    def lookup(index: int, raw: torch.Tensor, scale) -> torch.Tensor:
        if deltas[index] is None:
            deltas[index] = torch.zeros_like(raw).requires_grad_()
        return (raw + deltas[index]) * scale

    with replaced_lookups(model, names, lookup):
        for astep in range(FREELB_STEPS):
            loss = closure() / FREELB_STEPS
            loss.backward()
            if astep == FREELB_STEPS - 1:
                break
            for index, delta in enumerate(deltas):
                delta_grad = delta.grad.clone().detach()
                denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1)
                denorm = torch.clamp(denorm, min=1e-8)
                deltas[index] = (delta + FREELB_LR * delta_grad / denorm).detach().requires_grad_()


def reference_gradient_penalty(model: nn.Module, names: tuple[str, ...], closure: Callable) -> None:
    """Finite-difference penalty: dL/de of every raw lookup e at a clean pass, then one pass at
    e + epsilon * dL/de, backpropagated."""
    raws: list[torch.Tensor] = []

    def clean(index: int, raw: torch.Tensor, scale) -> torch.Tensor:
        raws.append(raw.detach().requires_grad_())
        return raws[-1] * scale

    with replaced_lookups(model, names, clean):
        grads = torch.autograd.grad(closure(), raws)
    with replaced_lookups(model, names, lambda index, raw, scale: (raw + GP_EPSILON * grads[index]) * scale):
        closure().backward()


def run_reference(method: str, model: nn.Module, family: str, batch: dict) -> nn.Module:
    """The method's independent reference, on a copy of ``model`` (taken before fastadv touched it);
    returns the copy, whose gradients are the reference's."""
    lookups = FAMILIES[family].lookups
    if method in ("freelb", "gp"):
        reference = copy.deepcopy(model)
        closure = closure_of(reference, batch)
        (reference_freelb if method == "freelb" else reference_gradient_penalty)(reference, lookups, closure)
        return reference
    reference, name = untied_copy(model, lookups[0])
    closure = closure_of(reference, batch)
    if method == "fgm":
        fgm_loop(SnippetFGM(reference), closure, emb_name=name)
    else:  # pgd-step and pgd-calls: the same numbers
        pgd_snippet_step(reference, SnippetPGD(reference), closure, PGD_STEPS, emb_name=name)
    return reference


# ---------------------------------------------------------------- comparisons


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_restored(model: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert not changed, f"{what}: parameters not restored bit for bit: {changed[:5]}"


def gradient_differences(ours: nn.Module, reference: nn.Module) -> dict[str, float]:
    """||ours - reference|| / ||reference|| per parameter of ours with a gradient. A tied weight of ours
    is compared with the sum of the gradients of the reference's weights under the same names.

    The denominator is at least ``NOISE_FLOOR`` times the norm of the whole gradient: a gradient that
    is zero in exact arithmetic (an attention key bias, which softmax cancels: ~1e-12 here) is fp32
    rounding noise, with no relative precision to compare.
    """
    theirs = dict(reference.named_parameters(remove_duplicate=False))
    by_param: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in ours.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), (param, []))[1].append(name)
    pairs = {}
    for param, names in by_param.values():
        counterparts = list({id(theirs[n]): theirs[n] for n in names}.values())
        grads = [q.grad for q in counterparts if q.grad is not None]
        if param.grad is None:
            assert not param.requires_grad or not grads, f"{names[0]} has no gradient, the reference's has one"
            continue
        assert grads, f"{names[0]} has a gradient, the reference's has none"
        pairs[names[0]] = (param.grad.detach().double(), sum(grads).detach().double())
    assert pairs, "no parameter has a gradient"
    floor = NOISE_FLOOR * torch.cat([want.flatten() for _, want in pairs.values()]).norm()
    return {n: ((got - want).norm() / torch.maximum(want.norm(), floor)).item() for n, (got, want) in pairs.items()}


@contextmanager
def lookup_outputs(model: nn.Module, names: tuple[str, ...], prefix: str = "") -> Iterator[dict[str, list]]:
    """The output of each named module at each forward pass, as the model goes on with it (a hook
    registered after fastadv's sees what they return)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(prefix + name).register_forward_hook(
            lambda module, args, output, name=name: seen[name].append(output.detach().clone())
        )
        for name in names
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def assert_every_adversarial_pass_perturbed(seen: dict[str, list], passes: int, what: str) -> None:
    """Each lookup's output differs from its first pass's (clean, or FreeLB's delta = 0) in every later pass."""
    for name, outputs in seen.items():
        assert len(outputs) == passes, f"{what}: '{name}' looked up {len(outputs)} times in {passes} passes"
        same = [k for k in range(1, passes) if torch.equal(outputs[k], outputs[0])]
        assert not same, f"{what}: the lookup of '{name}' is not perturbed in pass(es) {same} (0 is clean)"


PASSES = {"fgm": 2, "pgd-step": PGD_STEPS + 1, "pgd-calls": PGD_STEPS + 1, "freelb": FREELB_STEPS, "gp": 2}
# The gradient of the passes had nothing been perturbed, in clean gradients: FGM and PGD accumulate the clean
# pass and the (last) adversarial one; FreeLB averages its passes; the penalty keeps the perturbed pass only.
UNPERTURBED = {"fgm": 2.0, "pgd-step": 2.0, "pgd-calls": 2.0, "freelb": 1.0, "gp": 1.0}


def run_and_compare(family: str, method: str, caplog: pytest.LogCaptureFixture) -> dict[str, float]:
    """Run the method on a copy of the family's model and its reference on another; check restore and
    the lookups seen; return the per-parameter gradient differences."""
    spec = FAMILIES[family]
    model, batch = model_of(family), batch_of(family)
    pristine = copy.deepcopy(model)  # before any fastadv object: a deep copy would copy its hooks
    with caplog.at_level(logging.INFO, logger="fastadv"):
        adversary = build_method(method, model)
    if method in ("fgm", "pgd-step", "pgd-calls"):
        output_mode = "target='output'" in caplog.text
        assert output_mode == spec.output_mode, f"target='auto' chose {'output' if output_mode else 'weight'} mode"
    before = snapshot(model)
    with lookup_outputs(model, spec.lookups) as seen:
        run_method(method, adversary, model, closure_of(model, batch))
    assert_restored(model, before, f"{family}-{method}")
    assert_every_adversarial_pass_perturbed(seen, PASSES[method], f"{family}-{method}")
    reference = run_reference(method, pristine, family, batch)
    # The gradients the passes would give with no perturbation at all: the comparison must tell them apart.
    closure_of(pristine, batch)().backward()
    for param in pristine.parameters():
        if param.grad is not None:
            param.grad.mul_(UNPERTURBED[method])
    effect = max(gradient_differences(model, pristine).values())
    assert effect > 100 * TOLERANCE, f"the perturbation moved the gradients by {effect:.3g} only: proves nothing"
    return gradient_differences(model, reference)


# ---------------------------------------------------------------- the tests


def cases(families) -> list:
    """(family, method) for every method, with ids that read as family-method."""
    return [pytest.param(f, m, id=f"{f}-{m}") for f in families for m in METHODS]


@pytest.mark.parametrize("family,method", cases(FAMILIES))
def test_default_call_matches_the_reference(family, method, caplog):
    differences = run_and_compare(family, method, caplog)
    worst_name = max(differences, key=differences.get)
    worst = differences[worst_name]
    print(f"{family}-{method}: max relative gradient difference {worst:.3g} ({worst_name})")
    assert worst <= TOLERANCE, f"{family}-{method}: '{worst_name}' gradient differs by {worst:.3g} (relative)"


@pytest.mark.parametrize("family,method", cases(["t5", "bart"]))
def test_t5_and_bart_perturb_the_encoder_input_by_default(family, method):
    """On T5 and BART the encoder's input is perturbed by FGM/PGD/FreeLB/GP by default (and the decoder's)."""
    model, batch = model_of(family), batch_of(family)
    adversary = build_method(method, model)
    encoder, decoder = FAMILIES[family].lookups
    with lookup_outputs(model, (encoder, decoder)) as seen:
        run_method(method, adversary, model, closure_of(model, batch))
    clean = seen[encoder][0]
    for k, output in enumerate(seen[encoder][1:], start=1):
        assert not torch.equal(output, clean), f"the encoder's input was not perturbed in pass {k} (0 is clean)"
        assert relative_difference(output, clean) > 1e-3
    assert_every_adversarial_pass_perturbed({decoder: seen[decoder]}, PASSES[method], f"{family}-{method}")


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_emb_name_of_the_encoder_lookup_perturbs_the_encoder_only(family, caplog):
    """emb_name='encoder.embed_tokens' names one lookup of a shared table: output mode (weight rows
    would reach the decoder too), equal to perturbing the encoder's raw lookup only."""
    encoder, decoder = FAMILIES[family].lookups
    model, batch = model_of(family), batch_of(family)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="fastadv"):
        fgm = FGM(model, emb_name="encoder.embed_tokens")
    assert f"in '{encoder}' (target='output')" in caplog.text, caplog.text
    before = snapshot(model)
    losses: list[torch.Tensor] = []
    with lookup_outputs(model, (encoder, decoder)) as seen:
        fgm_loop(fgm, closure_of(model, batch, losses))
    assert_restored(model, before, f"{family} encoder only")
    assert not torch.equal(seen[encoder][1], seen[encoder][0]), "the encoder's lookup was not perturbed"
    assert torch.equal(seen[decoder][1], seen[decoder][0]), "the decoder's lookup was perturbed"

    # Reference: FGM on the encoder's raw lookup alone, its gradient summed per id (the rows' gradient).
    captured: list[torch.Tensor] = []
    table = reference.get_submodule(encoder).weight
    ids = batch["input_ids"]

    def clean(index: int, raw: torch.Tensor, scale) -> torch.Tensor:
        raw.retain_grad()
        captured.append(raw)
        return raw * scale

    reference_losses: list[torch.Tensor] = []
    closure = closure_of(reference, batch, reference_losses)
    with replaced_lookups(reference, (encoder,), clean):
        closure().backward()
    rows = torch.zeros_like(table).index_add_(0, ids.reshape(-1), captured[0].grad.reshape(-1, table.shape[1]))
    padding = reference.get_submodule(encoder).padding_idx
    if padding is not None:
        rows[padding] = 0
    delta = rows / rows.norm()
    with replaced_lookups(reference, (encoder,), lambda index, raw, scale: (raw + delta[ids]) * scale):
        closure().backward()
    assert abs(losses[1] - reference_losses[1]).item() <= TOLERANCE * abs(reference_losses[1]).item()
    assert abs(losses[1] - losses[0]).item() > 1e-4 * abs(losses[0]).item(), "the perturbation changed nothing"
    differences = gradient_differences(model, reference)
    worst = max(differences.values())
    print(f"{family}-encoder-only: max relative gradient difference {worst:.3g}")
    assert worst <= TOLERANCE, differences


def test_peft_modules_to_save_emb_name_targets_the_trained_copy():
    """emb_name='embed_tokens' matches PEFT's idle original_module and the trained copy: the copy is
    perturbed (weight rows: trainable, untied), the original never, as the snippet does on a copy."""
    family = "llama-lora-save-embed"
    model, batch = model_of(family), batch_of(family)
    reference = copy.deepcopy(model)
    wrapper = model.get_submodule(_PEFT_LLAMA)
    original, trained = wrapper.original_module.weight, wrapper.modules_to_save["default"].weight
    assert not original.requires_grad and trained.requires_grad
    fgm = FGM(model, emb_name="embed_tokens")
    before = snapshot(model)
    original_before, trained_before = original.detach().clone(), trained.detach().clone()
    during = []

    def closure() -> torch.Tensor:
        during.append((torch.equal(original, original_before), torch.equal(trained, trained_before)))
        return model(**batch).loss

    fgm_loop(fgm, closure)
    assert during == [(True, True), (True, False)], "the attack must move the trained copy's rows, never the original"
    assert_restored(model, before, "modules_to_save")
    fgm_loop(SnippetFGM(reference), closure_of(reference, batch), emb_name="embed_tokens")
    differences = gradient_differences(model, reference)
    worst = max(differences.values())
    print(f"{family}-emb_name: max relative gradient difference {worst:.3g}")
    assert worst <= TOLERANCE, differences
    assert original.grad is None


@pytest.mark.parametrize("family,method", cases(["bert", "gpt2"]))
def test_data_parallel_finds_the_embedding_and_equals_the_unwrapped_run(family, method):
    """nn.DataParallel is looked through with the default emb_name (on CPU it calls the module)."""
    model, batch = model_of(family), batch_of(family)
    unwrapped = copy.deepcopy(model)
    wrapped = nn.DataParallel(model)
    adversary = build_method(method, wrapped)
    before = snapshot(wrapped)
    with lookup_outputs(wrapped, FAMILIES[family].lookups, prefix="module.") as seen:
        run_method(method, adversary, wrapped, closure_of(wrapped, batch))
    assert_restored(wrapped, before, f"DataParallel({family})-{method}")
    assert_every_adversarial_pass_perturbed(seen, PASSES[method], f"DataParallel({family})-{method}")
    run_method(method, build_method(method, unwrapped), unwrapped, closure_of(unwrapped, batch))
    differences = gradient_differences(model, unwrapped)
    assert max(differences.values()) == 0.0, differences  # the same operations: bit for bit


def test_gemma_output_mode_equals_weight_mode_on_an_untied_copy(caplog):
    """The acceptance line: FGM on tied Gemma (output mode, delta scaled by embed_scale onto the module's
    output) equals FGM in weight mode on a copy whose lm_head has its own weight."""
    model, batch = model_of("gemma"), batch_of("gemma")
    untied, _ = untied_copy(model, "model.embed_tokens")
    with caplog.at_level(logging.INFO, logger="fastadv"):
        fgm = FGM(model)
    assert "tied" in caplog.text and "target='output'" in caplog.text
    losses: list[torch.Tensor] = []
    fgm_loop(fgm, closure_of(model, batch, losses))
    weight_losses: list[torch.Tensor] = []
    fgm_loop(FGM(untied, target="weight"), closure_of(untied, batch, weight_losses))
    assert abs(losses[1] - weight_losses[1]).item() <= TOLERANCE * abs(weight_losses[1]).item()
    assert abs(losses[1] - losses[0]).item() > 1e-4 * abs(losses[0]).item(), "the perturbation changed nothing"
    differences = gradient_differences(model, untied)
    assert max(differences.values()) <= TOLERANCE, differences

"""Bad arguments get a clear error that says what was found (issue 30, item 8): an emb_name that is not a
string, a size past float's range, a NumPy float32 refused where float64 passed, a truthy string for
``enabled``."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from models import batches, tiny_bert
from torch import nn

from fastadv import FGM, PGD, R3F, SMART, VAT, EmbeddingNotFoundError, FastAdvWarning, FreeLB, GradientPenalty

# Each method with the name of one of its sizes.
METHODS: dict[str, tuple[Callable[..., object], str]] = {
    "fgm": (FGM, "epsilon"),
    "pgd": (PGD, "alpha"),
    "freelb": (FreeLB, "adv_lr"),
    "gp": (GradientPenalty, "epsilon"),
    "vat": (VAT, "xi"),
    "smart": (SMART, "step_size"),
    "r3f": (R3F, "epsilon"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_an_emb_name_that_is_not_a_string_is_named(method):
    make, _ = METHODS[method]
    with pytest.raises(TypeError, match=r"emb_name must be a string .* found list \['word_embeddings'\]"):
        make(tiny_bert(), emb_name=["word_embeddings"])


def test_an_emb_name_list_given_to_attack_is_named_and_nothing_is_perturbed():
    model = tiny_bert()
    fgm = FGM(model)
    ids, labels = batches(1)[0]
    model(input_ids=ids, labels=labels).loss.backward()
    before = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(TypeError, match="emb_name must be a string"):
        fgm.attack(1.0, ["word_embeddings"])
    assert torch.equal(model.get_input_embeddings().weight, before)
    fgm.attack()  # and the adversary still works
    fgm.restore()


@pytest.mark.parametrize("method", list(METHODS))
def test_a_size_past_floats_range_is_refused_as_not_finite(method):
    make, size = METHODS[method]
    with pytest.raises(ValueError, match=f"{size} must be finite and >= 0, found an int of 401 digits"):
        make(tiny_bert(), **{size: 10**400})


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", [np.float32, np.float64, np.int64])
def test_numpy_sizes_are_taken_as_python_numbers(method, kind):
    make, size = METHODS[method]
    adversary = make(tiny_bert(), **{size: kind(0.5 if kind is not np.int64 else 1)})
    value = getattr(adversary, size)
    assert type(value) is float and value == float(kind(0.5 if kind is not np.int64 else 1))


def closure_for(method: str, model: nn.Module) -> Callable[[], object]:
    ids, labels = batches(1)[0]
    if method in ("vat", "smart", "r3f"):
        return lambda: model(input_ids=ids, labels=labels)
    return lambda: model(input_ids=ids, labels=labels).loss


@pytest.mark.parametrize("method", list(METHODS))
def test_enabled_must_be_a_bool_and_a_numpy_bool_is_one(method):
    make, _ = METHODS[method]
    model = tiny_bert()
    adversary = make(model)
    calls = []
    closure = closure_for(method, model)

    def counted():
        calls.append(None)
        return closure()

    with pytest.raises(TypeError, match="enabled must be True or False, found str 'no'"):
        adversary.step(counted, enabled="no")
    assert calls == [], "the adversary ran on a truthy string"
    adversary.step(counted, enabled=np.bool_(False))
    assert len(calls) == 1, "enabled=np.False_ is a plain step: one forward"


@pytest.mark.parametrize("method", ["vat", "smart", "r3f"])
def test_an_attention_mask_of_the_wrong_shape_is_refused_by_every_consistency_method(method):
    make, _ = METHODS[method]
    model = tiny_bert()
    adversary = make(model)
    ids, labels = batches(1)[0]
    wrong = torch.ones(ids.shape[0], ids.shape[1] + 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 16\), the ids .* have shape \(4, 13\)"):
        adversary.step(lambda: model(input_ids=ids, labels=labels), attention_mask=wrong)
    adversary.step(lambda: model(input_ids=ids, labels=labels), attention_mask=torch.ones_like(ids))


class LooksUpABareParameter(nn.Module):
    """An embedding through F.embedding on a parameter of its own: no nn.Embedding module."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(50, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.embedding(ids, self.table).mean(1))


@pytest.mark.parametrize("method", ["freelb", "vat", "smart", "r3f"])
def test_a_table_without_an_embedding_module_is_refused_in_the_methods_own_name(method):
    make, _ = METHODS[method]
    name = {"freelb": "FreeLB", "vat": "VAT", "smart": "SMART", "r3f": "R3F"}[method]
    with pytest.raises(EmbeddingNotFoundError, match=rf"{name} perturbs embedding lookups: the model has no nn\."):
        make(LooksUpABareParameter(), emb_name="table")


@pytest.mark.parametrize(
    "make",
    [
        lambda model: PGD(model, epsilon=1.0, alpha=0.0),
        lambda model: PGD(model, epsilon=0.0, alpha=0.0),
        lambda model: FreeLB(model, adv_lr=0.0),
        lambda model: FreeLB(model, adv_lr=0.0, adv_init_mag=0.1),
    ],
    ids=["pgd-alpha", "pgd-epsilon", "freelb", "freelb-random-start"],
)
def test_a_size_that_makes_the_adversary_a_plain_step_is_warned_of(make):
    with pytest.warns(FastAdvWarning, match="=0: .* (plain steps|enabled=False)"):
        make(tiny_bert())


def test_usual_sizes_are_not_warned_of():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PGD(tiny_bert(), epsilon=1.0, alpha=0.3)
        FreeLB(tiny_bert(), adv_lr=0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda model: FGM(model, target="weight"),
        lambda model: FGM(model, target="output"),
        lambda model: PGD(model, 0.05, 0.03, target="output"),
        lambda model: GradientPenalty(model, 0.5),
        lambda model: GradientPenalty(model, 0.5, mode="exact"),
    ],
    ids=["fgm-weight", "fgm-output", "pgd-output", "gp-fd", "gp-exact"],
)
def test_after_remove_hooks_a_step_says_so_not_call_backward(make):
    model = tiny_bert()
    adversary = make(model)
    adversary.remove_hooks()
    ids, labels = batches(1)[0]
    with pytest.raises(RuntimeError, match=r"hooks were removed by remove_hooks\(\): create a new"):
        adversary.step(lambda: model(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("method", ["vat", "smart", "r3f"])
def test_a_regression_head_is_refused_by_the_consistency_methods_not_trained_with_a_zero_term(method):
    """Issue 30, item 2: the KL over one output is zero, so the term added nothing at 2-4x the cost, silently."""
    from transformers import BertConfig, BertForSequenceClassification

    make, _ = METHODS[method]
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)  # fmt: skip
    model = BertForSequenceClassification(config)
    adversary = make(model)
    ids, _ = batches(1)[0]
    targets = torch.randn(ids.shape[0])
    with pytest.raises(ValueError, match=r"one output \(a regression head, num_labels=1\)"):
        adversary.step(lambda: model(input_ids=ids, labels=targets))
    assert all(p.grad is None for p in model.parameters()), "a refused step trained nothing"


def test_what_auto_chose_is_a_public_attribute():
    """Issue 30, item 12: the choice was only an INFO log line, invisible by default."""
    from models import tiny_gpt2

    bert = tiny_bert()
    assert FGM(bert).chosen_targets == {"bert.embeddings.word_embeddings.weight": "weight"}
    assert FGM(bert, target="output").chosen_targets == {"bert.embeddings.word_embeddings.weight": "output"}
    assert set(FGM(tiny_gpt2(tied=True)).chosen_targets.values()) == {"output"}, "a tied table: the output"
    frozen = tiny_bert()
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert set(PGD(frozen).chosen_targets.values()) == {"output"}, "a frozen table: the output"

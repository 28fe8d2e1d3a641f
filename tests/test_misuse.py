"""Every misuse gets a clear error or survives as documented, and the weights are never lost."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from models import BagOfEmbeddings, bag_loss, batches, bert_loss, tiny_bert
from torch import nn

from fastadv import (
    FGM,
    AttackStateError,
    EmbeddingNotFoundError,
    FrozenEmbeddingError,
    MissingGradientError,
)
from fastadv.snippets import SnippetFGM


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed"


def test_emb_name_matching_nothing_lists_the_embeddings():
    model = tiny_bert()
    with pytest.raises(EmbeddingNotFoundError) as err:
        FGM(model, emb_name="emb.")  # the snippet's default silently does nothing on BERT
    message = str(err.value)
    assert "'emb.' matches no parameter" in message
    assert "bert.embeddings.word_embeddings.weight" in message and "position_embeddings" in message
    fgm = FGM(model)
    bert_loss(model, *batches(1)[0]).backward()
    before = snapshot(model)
    with pytest.raises(EmbeddingNotFoundError, match="'nope' matches no parameter"):
        fgm.attack(1.0, "nope")
    assert_unchanged(model, before)


def test_several_embeddings_and_no_getter_asks_for_emb_name():
    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos = nn.Embedding(10, 4)

    with pytest.raises(EmbeddingNotFoundError, match=r"2 nn.Embedding modules \('tok', 'pos'\).*emb_name="):
        FGM(TwoTables())


def test_a_container_of_one_hf_model_uses_its_input_embedding_and_of_two_asks_for_emb_name():
    class Head(nn.Module):  # as sentence-transformers wraps a BertModel: no get_input_embeddings of its own
        def __init__(self, towers: int):
            super().__init__()
            self.towers = nn.ModuleList(tiny_bert() for _ in range(towers))

    one = Head(1)
    fgm = FGM(one, target="weight")
    assert [t.name for t in fgm._targets(None)] == ["towers.0.bert.embeddings.word_embeddings.weight"]
    with pytest.raises(EmbeddingNotFoundError, match=r"6 nn.Embedding modules .*emb_name="):
        FGM(Head(2))  # two towers' tables: which one is the user's to say


def test_no_embedding_at_all():
    with pytest.raises(EmbeddingNotFoundError, match=r"no nn\.Embedding"):
        FGM(nn.Linear(3, 3))


def test_attack_before_backward():
    model = tiny_bert()
    fgm = FGM(model)
    before = snapshot(model)
    with pytest.raises(MissingGradientError, match=r"no gradient: call loss.backward\(\)"):
        fgm.attack()
    assert_unchanged(model, before)
    with pytest.raises(AttackStateError, match="without a matching attack"):
        fgm.restore()  # the failed attack left nothing to restore


def test_fgm_created_after_the_forward_pass():
    model = tiny_bert()
    bert_loss(model, *batches(1)[0]).backward()
    fgm = FGM(model)
    with pytest.raises(MissingGradientError, match=r"saw no lookup.*before the forward pass"):
        fgm.attack()


def test_frozen_embedding_in_weight_mode_points_to_output_mode():
    model = tiny_bert()
    model.get_input_embeddings().weight.requires_grad_(False)
    with pytest.raises(FrozenEmbeddingError, match=r"does not require grad.*target='output'"):
        FGM(model, target="weight")
    with pytest.raises(FrozenEmbeddingError, match="matches only frozen parameters"):
        FGM(model, emb_name="word_embeddings", target="weight")
    assert FGM(model).target == "auto"  # auto takes the output there instead


def test_embedding_frozen_after_construction():
    model = tiny_bert()
    fgm = FGM(model)
    bert_loss(model, *batches(1)[0]).backward()
    model.get_input_embeddings().weight.requires_grad_(False)
    with pytest.raises(FrozenEmbeddingError, match="output"):
        fgm.attack()


def bert_after_a_backward() -> tuple[torch.nn.Module, FGM, dict[str, torch.Tensor]]:
    """A tiny BERT after one clean backward, its FGM (built before it), and a snapshot of its clean weights."""
    model = tiny_bert()
    fgm = FGM(model)
    bert_loss(model, *batches(1)[0]).backward()
    return model, fgm, snapshot(model)


def test_second_attack_is_refused_and_weights_stay_intact(backend):
    model, fgm, clean = bert_after_a_backward()
    fgm.attack()
    perturbed = snapshot(model)
    with pytest.raises(AttackStateError, match="called again before restore"):
        fgm.attack()
    assert_unchanged(model, perturbed)  # not perturbed twice
    fgm.restore()
    assert_unchanged(model, clean)


def test_restore_without_attack():
    fgm = FGM(tiny_bert())
    with pytest.raises(AttackStateError, match="without a matching attack"):
        fgm.restore()


def test_restore_naming_other_parameters_keeps_the_backup():
    model, fgm, clean = bert_after_a_backward()
    fgm.attack(1.0, "word_embeddings")
    with pytest.raises(EmbeddingNotFoundError, match="other parameters than attack"):
        fgm.restore("position_embeddings")
    fgm.restore("word_embeddings")
    assert_unchanged(model, clean)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_skips_the_step_on_the_device(backend, bad):
    model = tiny_bert()
    fgm = FGM(model)
    ids, labels = batches(1)[0]
    bert_loss(model, ids, labels).backward()
    model.get_input_embeddings().weight.grad[ids[0, 0]] = bad
    clean = snapshot(model)
    fgm.attack()
    assert_unchanged(model, clean)
    fgm.restore()
    assert_unchanged(model, clean)
    assert fgm.skipped_steps == 1
    model.zero_grad()
    bert_loss(model, ids, labels).backward()
    with fgm.perturbed():
        assert not torch.equal(model.get_input_embeddings().weight, clean["bert.embeddings.word_embeddings.weight"])
    assert fgm.skipped_steps == 1


def test_non_finite_gradient_in_one_of_several_parameters_skips_all(backend):
    model = tiny_bert()
    fgm = FGM(model, emb_name="emb")
    ids, labels = batches(1)[0]
    bert_loss(model, ids, labels).backward()
    model.bert.embeddings.LayerNorm.weight.grad[0] = float("nan")
    clean = snapshot(model)
    fgm.attack()
    assert_unchanged(model, clean)
    fgm.restore()
    assert fgm.skipped_steps == 1


def test_zero_gradient_leaves_weights_and_is_not_a_skip(backend):
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model)
    ids, _ = batches(1)[0]
    (model(ids) * 0).sum().backward()
    clean = snapshot(model)
    with fgm.perturbed():
        assert_unchanged(model, clean)
    assert fgm.skipped_steps == 0


def test_exception_inside_perturbed_still_restores(backend):
    model, fgm, clean = bert_after_a_backward()
    with pytest.raises(ZeroDivisionError):
        with fgm.perturbed():
            assert not torch.equal(model.get_input_embeddings().weight, clean["bert.embeddings.word_embeddings.weight"])
            _ = 1 / 0
    assert_unchanged(model, clean)
    fgm.attack()  # and the state machine is ready for the next step
    fgm.restore()


@pytest.mark.parametrize(
    "loss,error",
    [
        (lambda m, x: m(x), r"scalar tensor, found \(4, 3\)"),
        (lambda m, x: 3.0, "scalar tensor, found float"),
        (lambda m, x: m(x).sum().detach(), "does not require grad"),
    ],
    ids=["vector", "float", "detached"],
)
def test_step_with_a_bad_closure(loss, error):
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model)
    ids = batches(1)[0][0]
    with pytest.raises((TypeError, RuntimeError), match=error):
        fgm.step(lambda: loss(model, ids))
    with pytest.raises(AttackStateError):
        fgm.restore()  # nothing left perturbed


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"epsilon": -1.0}, ValueError),
        ({"epsilon": float("nan")}, ValueError),
        ({"epsilon": torch.tensor(1.0)}, TypeError),
        ({"norm": "l1"}, ValueError),
    ],
    ids=["negative-eps", "nan-eps", "tensor-eps", "unknown-norm"],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        FGM(BagOfEmbeddings(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        FGM(lambda x: x)


def test_zeroing_the_version_counter_cannot_see_stays_exact_and_warns(backend, monkeypatch):
    """Old scripts' ``p.grad.data.zero_()`` zeroes behind the version counter, so the record never
    resets (zero_grad(set_to_none=False) does reset it: test_fgm_snippet): exact, slower, said once."""
    from fastadv import FastAdvWarning
    from fastadv.targets.recorder import LookupRecorder

    monkeypatch.setattr(LookupRecorder, "COMPACT_FLOOR", 30)  # compact after 30 + 4 * 211 ids
    torch.manual_seed(0)
    model = BagOfEmbeddings().to(DEVICE)
    reference = copy.deepcopy(model)
    data = batches(12, repeats=False)
    with pytest.warns(FastAdvWarning, match=r"p\.grad\.data\.zero_\(\)") as caught:
        for current, adversary in ((model, FGM(model)), (reference, SnippetFGM(reference))):
            opt = torch.optim.SGD(current.parameters(), lr=0.1)
            for ids, labels in data:
                for p in current.parameters():
                    if p.grad is not None:
                        p.grad.data.zero_()
                bag_loss(current, ids, labels).backward()
                adversary.attack()
                bag_loss(current, ids, labels).backward()
                adversary.restore()
                opt.step()
    assert len([w for w in caught if issubclass(w.category, FastAdvWarning)]) == 1
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm(), name


def test_hooks_come_off_when_fgm_is_dropped_or_removed():
    import gc

    model = tiny_bert()

    def hook_count():
        table = model.get_input_embeddings()
        return len(table._forward_hooks) + len(table.weight._post_accumulate_grad_hooks or {})

    fgm = FGM(model)
    bert_loss(model, *batches(1)[0]).backward()
    # The lookup's one forward hook, which serves the recorder and the row-gradient lookup (the end of a
    # backward is seen by a callback)
    assert hook_count() == 1
    del fgm
    gc.collect()
    assert hook_count() == 0
    model.zero_grad()
    fgm = FGM(model)
    fgm.remove_hooks()
    assert hook_count() == 0
    bert_loss(model, *batches(1)[0]).backward()
    # Issue 30, item 9: the error says the hooks were removed (it said the table was added after FGM was built).
    with pytest.raises(RuntimeError, match=r"hooks were removed by remove_hooks\(\)"):
        fgm.attack()


def test_embedding_frozen_at_creation_and_unfrozen_later_is_watched(backend):
    model = tiny_bert()
    table = model.get_input_embeddings()
    table.weight.requires_grad_(False)
    fgm = FGM(model, emb_name="LayerNorm")  # builds fine: other trainable parameters match
    table.weight.requires_grad_(True)
    bert_loss(model, *batches(1)[0]).backward()
    before = table.weight.detach().clone()
    with fgm.perturbed(emb_name="word_embeddings"):
        changed = (table.weight != before).any(dim=1)
    assert 0 < int(changed.sum()) < table.weight.shape[0], "not a sparse row update"


def test_an_input_embedding_forward_never_calls_is_named_with_the_way_out():
    """BART with tie_word_embeddings=False: get_input_embeddings() returns `shared`, which forward never
    calls (the encoder and decoder have tables of their own). The error says so, not 'call backward'."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=53, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = BartForConditionalGeneration(config).to(DEVICE)
    fgm = FGM(model)
    ids = batches(1, vocab=53)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(MissingGradientError, match=r"no forward pass has looked 'model\.shared\.weight' up.*emb_name="):
        fgm.attack()
    named = FGM(model, emb_name="encoder.embed_tokens")
    model(input_ids=ids, labels=ids).loss.backward()
    with named.perturbed():
        pass

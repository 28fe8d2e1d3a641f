"""The cases a hostile new user found (issue 18): each gets the right numbers or an error that says what to do.

Sections follow the issue's list. Tiny BERT models on the torch path unless a test asks for both backends.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from models import BagOfEmbeddings, bag_loss, batches, bert_loss, tiny_bert, tiny_gpt2
from torch import nn

from fastadv import FGM, PGD, AttackStateError, EmbeddingNotFoundError, FastAdvWarning, FreeLB, GradientPenalty
from fastadv.ops import (
    RowSet,
    row_set_from_ids,
    rows_backup_add,
    rows_l2_norm,
    rows_pgd_step,
    rows_restore,
    segment_sum_by_id,
)
from fastadv.snippets import SnippetFGM, SnippetPGD, pgd_snippet_step

ADVERSARIES: dict[str, Callable[[nn.Module], object]] = {
    "fgm-weight": lambda model: FGM(model, target="weight"),
    "fgm-output": lambda model: FGM(model, target="output"),
    "pgd": lambda model: PGD(model, 0.05, 0.03),
    "freelb": lambda model: FreeLB(model, adv_lr=0.05, adv_steps=2),
    "gp-exact": lambda model: GradientPenalty(model, 0.5, mode="exact"),
    "gp-fd": lambda model: GradientPenalty(model, 0.5),
}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------ 6, 10: copies of a model with an adversary on it


def saved_and_loaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch.save": saved_and_loaded,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("method", list(ADVERSARIES))
def test_a_model_copies_pickles_and_saves_after_a_step_and_its_copy_trains_plainly(method, how):
    model = tiny_bert(attention="eager")
    (ids, labels), (ids2, labels2) = batches(2)
    adversary = ADVERSARIES[method](model)
    adversary.step(lambda: bert_loss(model, ids, labels))
    model.zero_grad()

    duplicate = COPIES[how](model)  # an EMA or best-model copy, a checkpoint of the whole module

    assert torch.equal(logits(duplicate, ids2), logits(model, ids2))
    # The copy carries no live state of the adversary: its backward is a plain one, and the original's adversary
    # neither records nor perturbs the copy's lookups.
    plain = tiny_bert(attention="eager")
    plain.load_state_dict(duplicate.state_dict())
    bert_loss(duplicate, ids2, labels2).backward()
    bert_loss(plain, ids2, labels2).backward()
    for (name, p), q in zip(duplicate.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), f"{name}: the copy's gradient is not a plain backward's"
    # An adversary built on the copy works there, and the original's still works on the original.
    duplicate.zero_grad()
    ADVERSARIES[method](duplicate).step(lambda: bert_loss(duplicate, ids2, labels2))
    adversary.step(lambda: bert_loss(model, ids2, labels2))


def test_a_copy_taken_while_output_mode_is_perturbed_is_not_perturbed():
    model = tiny_bert()
    (ids, labels), (ids2, _) = batches(2)
    clean = logits(model, ids2)
    fgm = FGM(model, target="output")
    bert_loss(model, ids, labels).backward()
    fgm.attack()
    duplicate = copy.deepcopy(model)
    fgm.restore()
    assert torch.equal(logits(duplicate, ids), logits(model, ids))  # the batch's rows: no delta in the copy
    assert torch.equal(logits(duplicate, ids2), clean)
    duplicate.load_state_dict(model.state_dict())
    assert torch.equal(logits(duplicate, ids), logits(model, ids))


# ------------------------------------------------------------ 11: dtype changes and float64 tables

CONVERSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "half": nn.Module.half,
    "double": nn.Module.double,
    "bfloat16": lambda model: model.to(torch.bfloat16),
}


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_a_model_converted_between_attack_and_restore_gets_its_clean_rows_back_converted(backend, conversion):
    model = tiny_bert()
    ids, labels = batches(1)[0]
    fgm = FGM(model, target="weight")
    bert_loss(model, ids, labels).backward()
    fgm.attack()
    CONVERSIONS[conversion](model)
    fgm.restore()
    clean = CONVERSIONS[conversion](tiny_bert())
    for (name, p), q in zip(model.named_parameters(), clean.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} is not the clean model's, converted"


def test_a_restore_that_fails_keeps_the_saved_rows_for_the_next(monkeypatch):
    model = tiny_bert()
    before = snapshot(model)
    ids, labels = batches(1)[0]
    fgm = FGM(model, target="weight")
    bert_loss(model, ids, labels).backward()
    fgm.attack()
    (target, _), *_ = fgm._attacked
    restore = type(target).restore

    def fails_once(self, saved):
        monkeypatch.setattr(type(target), "restore", restore)
        raise RuntimeError("the device went away")

    monkeypatch.setattr(type(target), "restore", fails_once)
    with pytest.raises(RuntimeError, match="device went away"):
        fgm.restore()
    fgm.restore()  # the rows were kept: this one puts them back
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} lost its clean rows"


def fgm_gradients(model: nn.Module, adversary, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    bert_loss(model, ids, labels).backward()
    adversary.attack(1.0, "word_embeddings")
    bert_loss(model, ids, labels).backward()
    adversary.restore("word_embeddings")
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("target", ["weight", "output"])
def test_a_float64_model_trains_on_every_path_as_the_snippet(backend, target):
    """fastadv's arithmetic is fp32 for every storage dtype (the kernels' contract): the perturbation is the
    snippet's rounded to fp32, so the gradients agree to fp32's precision, not fp64's."""
    from fastadv.snippets import SnippetFGM

    ids, labels = batches(1)[0]
    model, reference = tiny_bert(dtype=torch.float64), tiny_bert(dtype=torch.float64)
    before = snapshot(model)
    got = fgm_gradients(model, FGM(model, target=target), ids, labels)
    want = fgm_gradients(reference, SnippetFGM(reference), ids, labels)
    assert got.dtype == torch.float64
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} was not restored"
    for method in ("pgd", "freelb", "gp-fd"):
        model.zero_grad()
        ADVERSARIES[method](model).step(lambda: bert_loss(model, ids, labels))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()), method


# ------------------------------------------------------------ 12: an empty batch


def bag() -> BagOfEmbeddings:
    torch.manual_seed(0)
    return BagOfEmbeddings()


def summed_bag_loss(model: BagOfEmbeddings, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sums over tokens and examples: no tokens, no gradient for the table (and no NaN from a mean over none)."""
    pooled = torch.tanh(model.emb(ids)).sum(dim=1)
    return nn.functional.cross_entropy(model.head(pooled), labels, reduction="sum")


EMPTY_BATCH_ADVERSARIES: dict[str, Callable[[nn.Module], object]] = {
    **ADVERSARIES,
    "fgm-output-per-position": lambda model: FGM(model, target="output", share_rows=False),
    "pgd-output": lambda model: PGD(model, 0.05, 0.03, target="output"),
}


@pytest.mark.parametrize("shape", [(0, 13), (4, 0)], ids=["no-examples", "no-tokens"])
@pytest.mark.parametrize("method", list(EMPTY_BATCH_ADVERSARIES))
def test_an_empty_batch_steps_without_error_and_leaves_nothing_perturbed(backend, method, shape):
    model = bag()
    before = snapshot(model)
    adversary = EMPTY_BATCH_ADVERSARIES[method](model)
    empty = (torch.randint(1, 200, shape), torch.randint(0, 3, shape[:1]))
    adversary.step(lambda: summed_bag_loss(model, *empty))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"
    assert not model.emb.weight.grad.any(), "no token, yet the table has a gradient"
    # Nothing is left perturbed or armed: the next, real batch trains as on a fresh adversary.
    ids, labels = torch.randint(1, 200, (4, 13)), torch.randint(0, 3, (4,))
    model.zero_grad()
    adversary.step(lambda: summed_bag_loss(model, ids, labels))
    fresh = bag()
    EMPTY_BATCH_ADVERSARIES[method](fresh).step(lambda: summed_bag_loss(fresh, ids, labels))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), f"{name}: the step after the empty batch differs"


# ------------------------------------------------------------ 13: the public ops check the ids they index with

BAD_ROWS = RowSet(torch.tensor([1, 12]), torch.tensor([1, 3]))  # row 12 of a 10-row table
BAD_GRAD_ROWS = RowSet(torch.tensor([1, 3]), torch.tensor([1, -1]))
ONE, YES = torch.tensor(1.0), torch.tensor(True)
OPS_WITH_BAD_IDS: dict[str, tuple[Callable, str]] = {
    "rows_backup_add": (lambda w, g: rows_backup_add(w, g, BAD_ROWS, ONE, YES, 0.1), r"row_set\.rows .* 1 to 12"),
    "rows_backup_add-grad": (lambda w, g: rows_backup_add(w, g, BAD_GRAD_ROWS, ONE, YES, 0.1), r"grad_rows .* -1"),
    "rows_restore": (lambda w, g: rows_restore(w, torch.zeros(2, 4), BAD_ROWS), r"row_set\.rows .* 1 to 12"),
    "rows_l2_norm": (lambda w, g: rows_l2_norm(g, BAD_GRAD_ROWS), r"grad_rows .* -1"),
    "rows_pgd_step": (lambda w, g: rows_pgd_step(w, g, BAD_ROWS, None, ONE, YES, 0.1, 0.5), r"1 to 12"),
    "row_set_from_ids": (
        lambda w, g: row_set_from_ids(torch.tensor([3, 10]), 10),
        r"ids .* 3 to 10, outside \[0, 10\)",
    ),
    "segment_sum_by_id": (lambda w, g: segment_sum_by_id(g[:2], torch.tensor([3, 10]), 10), r"3 to 10"),
}


@pytest.mark.parametrize("op", list(OPS_WITH_BAD_IDS))
def test_public_ops_refuse_ids_outside_the_table_and_write_nothing(backend, op):
    weight, grad = torch.randn(10, 4), torch.randn(10, 4)
    before = weight.clone()
    call, message = OPS_WITH_BAD_IDS[op]
    with pytest.raises(IndexError, match=message):
        call(weight, grad)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("target", ["weight", "output"])
def test_ids_are_checked_once_where_fastadv_builds_a_row_set_not_again_by_each_op(backend, target, monkeypatch):
    import importlib

    checks = importlib.import_module("fastadv.ops.checks")
    checked: list[str] = []
    real = checks.check_ids
    for module in ("checks", "row_set", "segment_sum_by_id"):  # each holds its own reference to the check
        spy = lambda what, ids, bound: (checked.append(what), real(what, ids, bound))  # noqa: E731
        monkeypatch.setattr(importlib.import_module(f"fastadv.ops.{module}"), "check_ids", spy)
    model = BagOfEmbeddings(200, 16)
    ids, labels = torch.randint(0, 200, (4, 13)), torch.randint(0, 3, (4,))
    fgm = FGM(model, target=target)
    bag_loss(model, ids, labels).backward()
    fgm.attack()
    bag_loss(model, ids, labels).backward()
    fgm.restore()
    # The norm, the perturbation and the restore (and output mode's re-addressing) took the row set as built.
    assert not any(what.startswith("row_set.") for what in checked), checked
    assert 1 <= checked.count("ids") <= 2, checked  # the record's row set, and output mode's segment sums


def test_a_row_set_whose_known_bound_exceeds_the_matrix_is_checked_again():
    rows = row_set_from_ids(torch.tensor([1, 12]), 20)  # checked against 20 rows, used on 10
    with pytest.raises(IndexError, match=r"row_set\.rows .* 1 to 12, outside \[0, 10\)"):
        rows_backup_add(torch.randn(10, 4), torch.randn(20, 4), rows, ONE, YES, 0.1)


def test_rows_restore_refuses_a_backup_that_is_not_the_saved_rows():
    weight = torch.randn(10, 4)
    rows = row_set_from_ids(torch.tensor([1, 3]), 10)
    with pytest.raises(ValueError, match=r"\[2, 4\] torch.float32, found \[3, 4\]"):
        rows_restore(weight, torch.zeros(3, 4), rows)
    with pytest.raises(ValueError, match=r"found \[2, 4\] torch.float16"):
        rows_restore(weight, torch.zeros(2, 4, dtype=torch.float16), rows)


# ------------------------------------------------------------ 5: two adversaries on one table


def first_attack(adversary: FGM | PGD) -> None:
    if isinstance(adversary, PGD):
        adversary.attack(is_first_attack=True)
    else:
        adversary.attack()


@pytest.mark.parametrize("second", ["fgm", "pgd"])
def test_weight_rows_restored_out_of_order_are_refused_and_the_right_order_restores_them(backend, second):
    model = tiny_bert()
    before = snapshot(model)
    ids, labels = batches(1)[0]
    older = FGM(model, target="weight")
    newer = FGM(model, target="weight") if second == "fgm" else PGD(model, 1.0, 0.3, target="weight")
    bert_loss(model, ids, labels).backward()
    first_attack(older)
    first_attack(newer)
    perturbed = snapshot(model)
    with pytest.raises(AttackStateError, match=r"reverse order of the attacks.*nothing was restored"):
        older.restore()
    for name, p in model.named_parameters():
        assert torch.equal(p, perturbed[name]), f"{name}: the refused restore wrote"
    newer.restore()
    older.restore()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} is not restored"


def test_output_deltas_come_off_in_any_order():
    model = tiny_bert()
    ids, labels = batches(1)[0]
    clean = logits(model, ids)
    older, newer = FGM(model, target="output"), FGM(model, target="output")
    bert_loss(model, ids, labels).backward()
    older.attack()
    newer.attack()
    assert not torch.equal(logits(model, ids), clean)
    older.restore()
    newer.restore()
    assert torch.equal(logits(model, ids), clean)


# ------------------------------------------------------------ 2: the embedding replaced after the adversary was built

REPLACED_TABLE_ADVERSARIES = ("fgm-weight", "fgm-output", "pgd")


@pytest.mark.parametrize("zeroed", [True, False], ids=["grad-zeroed", "grad-stale"])
@pytest.mark.parametrize("call", ["step", "snippet-calls"])
@pytest.mark.parametrize("method", REPLACED_TABLE_ADVERSARIES)
def test_an_embedding_replaced_after_the_adversary_was_built_is_named(method, call, zeroed):
    model = tiny_bert()
    ids, labels = batches(1)[0]
    closure = lambda: bert_loss(model, ids, labels)  # noqa: E731
    adversary = ADVERSARIES[method](model)
    closure().backward()  # a first step: the hooked table has a gradient
    if zeroed:
        model.zero_grad()
    old = model.get_input_embeddings()
    new = nn.Embedding(old.num_embeddings, old.embedding_dim, padding_idx=0)
    new.weight.data.copy_(old.weight.data)
    model.set_input_embeddings(new)
    before = {"old": old.weight.detach().clone(), "new": new.weight.detach().clone()}
    with pytest.raises(EmbeddingNotFoundError, match=r"no longer holds the table .* replaced .* Build"):
        if call == "step":
            adversary.step(closure)
        elif method == "pgd":
            pgd_snippet_step(model, adversary, closure, steps=2, epsilon=0.05, alpha=0.03)
        else:
            closure().backward()
            adversary.attack()
    assert torch.equal(old.weight, before["old"]) and torch.equal(new.weight, before["new"])
    assert adversary._attacked is None, "left armed"


# ------------------------------------------------------------ 9: an optimizer step or a checkpoint mid-attack


def test_an_optimizer_step_between_attack_and_restore_is_warned_of_and_normal_use_is_not():
    model = tiny_bert()
    ids, labels = batches(1)[0]
    closure = lambda: bert_loss(model, ids, labels)  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fgm, pgd = FGM(model, target="weight"), PGD(model, 0.05, 0.03, target="weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAdvWarning)  # the usual loops: the optimizer steps after restore()
        for _ in range(2):
            fgm.step(closure)
            optimizer.step()
            model.zero_grad()
            pgd.step(closure)
            pgd_snippet_step(model, pgd, closure, steps=3, epsilon=0.05, alpha=0.03)
            optimizer.step()
            model.zero_grad()
    closure().backward()
    fgm.attack()
    optimizer.step()
    with pytest.warns(FastAdvWarning, match=r"written between the attack and restore\(\).*optimizer after restore"):
        fgm.restore()
    assert fgm._attacked is None


def test_a_state_dict_taken_while_the_weight_is_perturbed_holds_the_clean_rows():
    model = tiny_bert()
    ids, labels = batches(1)[0]
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    fgm = FGM(model, target="weight")
    bert_loss(model, ids, labels).backward()
    fgm.attack()
    with pytest.warns(FastAdvWarning, match=r"state_dict\(\) was taken between FGM's attack and restore"):
        checkpoint = model.state_dict()
    assert checkpoint.keys() == clean.keys()
    for key, value in clean.items():
        assert torch.equal(checkpoint[key], value), f"{key} is not the clean one"
    table = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(model.get_input_embeddings().weight, clean[table]), "the model itself stays perturbed"
    fgm.restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAdvWarning)
        after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in clean.items())


@pytest.mark.parametrize("family", ["bert", "gpt2_tied"])
def test_a_deepcopy_taken_while_the_weight_is_perturbed_holds_the_clean_rows(family):
    # An EMA or best-model copy taken between attack() and restore() agrees with state_dict() at that moment.
    model = tiny_bert() if family == "bert" else tiny_gpt2(tied=True)
    ids, labels = batches(1)[0]
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'transformer.wte.weight' is tied", FastAdvWarning)
        fgm = FGM(model, target="weight")
    loss = bert_loss(model, ids, labels) if family == "bert" else model(input_ids=ids, labels=ids).loss
    loss.backward()
    fgm.attack()
    perturbed = model.get_input_embeddings().weight.detach().clone()
    with pytest.warns(FastAdvWarning, match=r"copy.deepcopy\(\) of the model was taken between FGM's attack and"):
        copied = copy.deepcopy(model)
    for key, value in copied.state_dict().items():
        assert torch.equal(value, clean[key]), f"the copy's {key} is not the clean one"
    if family == "gpt2_tied":
        assert copied.lm_head.weight is copied.get_input_embeddings().weight, "the copy's tie is broken"
    assert copied.get_input_embeddings().weight.requires_grad
    assert torch.equal(model.get_input_embeddings().weight, perturbed), "the model itself stays perturbed"
    assert not torch.equal(perturbed, clean[next(k for k in clean if "wte" in k or "word_embeddings" in k)])
    fgm.restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAdvWarning)
        after = copy.deepcopy(model)
    assert all(torch.equal(after.state_dict()[k], v) for k, v in clean.items())


def test_a_deepcopy_of_the_table_module_itself_holds_the_clean_rows():
    # The weight is the copied module's own parameter, deep-copied before the hook is reached.
    table = nn.Embedding(50, 8)
    clean = table.weight.detach().clone()
    fgm = FGM(table, target="weight")
    ids = torch.tensor([[1, 2, 3, 3]])
    table(ids).square().sum().backward()
    fgm.attack()
    with pytest.warns(FastAdvWarning, match="copy.deepcopy"):
        copied = copy.deepcopy(table)
    assert torch.equal(copied.weight, clean) and not torch.equal(table.weight, clean)
    fgm.restore()
    assert torch.equal(table.weight, clean)


# ------------------------------------------------------------ 1: a table whose gradient is not the lookups' alone


def table_used_outside_its_lookups(model: nn.Module, use: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The BERT loss plus a term on the table itself: a head tied by hand, or an L2 penalty on the weight."""
    table = model.get_input_embeddings().weight

    def loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if use == "tied-by-hand":
            hidden = model.bert(input_ids=ids).last_hidden_state
            extra = nn.functional.cross_entropy(nn.functional.linear(hidden, table).flatten(0, 1), ids.flatten())
        else:
            extra = 1e-3 * table.square().sum()
        return bert_loss(model, ids, labels) + extra

    return loss


@pytest.mark.parametrize("use", ["tied-by-hand", "l2-on-the-table"])
def test_a_table_used_outside_its_lookups_is_attacked_whole_as_the_snippet_and_warned_of(backend, use):
    def run(make, steps: int = 2) -> torch.Tensor:
        model = tiny_bert()
        adversary = make(model)
        loss = table_used_outside_its_lookups(model, use)
        for ids, labels in batches(steps):  # the second step's gradient starts from None again
            model.zero_grad()
            got = snippet_cycle(model, adversary, lambda ids=ids, labels=labels: loss(ids, labels))
        return got

    with pytest.warns(FastAdvWarning, match=r"not only from its lookups.*every row.*target='output'"):
        got = run(FGM)
    want = run(SnippetFGM)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6


def test_a_table_used_only_through_its_lookups_is_not_warned_of():
    model = tiny_bert()
    fgm = FGM(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAdvWarning)
        for ids, labels in batches(2):
            model.zero_grad()
            snippet_cycle(model, fgm, lambda ids=ids, labels=labels: bert_loss(model, ids, labels))
    (target,) = fgm._targets(None)
    model.zero_grad()
    ids, labels = batches(3)[2]
    bert_loss(model, ids, labels).backward()
    assert len(target.gradient("torch", None, False, None).rows) == ids.unique().numel(), "the batch's rows only"


# ------------------------------------------------------------ 3, 4: a gradient with rows no watched lookup gave


def snippet_cycle(model: nn.Module, adversary, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The snippet's calls around ``closure``'s clean and adversarial backward; returns every parameter's gradient."""
    closure().backward()
    adversary.attack(1.0, "word_embeddings")
    closure().backward()
    adversary.restore("word_embeddings")
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def bypassing_step(model: nn.Module, adversary) -> torch.Tensor:
    """A normal step, zero_grad(), then a step whose lookup bypasses the module (inputs_embeds by hand)."""
    (ids, labels), (ids2, labels2) = batches(2)
    bert_loss(model, ids, labels).backward()
    model.zero_grad()
    table = model.get_input_embeddings().weight
    return snippet_cycle(
        model, adversary, lambda: model(inputs_embeds=nn.functional.embedding(ids2, table), labels=labels2).loss
    )


def built_mid_accumulation(model: nn.Module, make: Callable[[nn.Module], object]) -> torch.Tensor:
    """The adversary built between two accumulated micro-batches."""
    (ids, labels), (ids2, labels2) = batches(2)
    bert_loss(model, ids, labels).backward()
    return snippet_cycle(model, make(model), lambda: bert_loss(model, ids2, labels2))


@pytest.mark.parametrize("case", ["lookup-bypasses-the-module", "built-mid-accumulation"])
def test_a_gradient_with_rows_no_watched_lookup_gave_is_attacked_whole_as_the_snippet_and_warned_of(backend, case):
    def run(make):
        model = tiny_bert()
        if case == "lookup-bypasses-the-module":
            return bypassing_step(model, make(model))
        return built_mid_accumulation(model, make)

    with pytest.warns(FastAdvWarning, match=r"no lookup fastadv watched gave it.*every row of the table"):
        got = run(lambda model: FGM(model, target="weight"))
    want = run(SnippetFGM)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6


def test_the_whole_table_is_read_only_until_the_gradient_is_next_reset():
    model = tiny_bert()
    fgm = FGM(model, target="weight")
    with pytest.warns(FastAdvWarning, match="no lookup fastadv watched"):
        bypassing_step(model, fgm)
    model.zero_grad()
    ids, labels = batches(3)[2]
    bert_loss(model, ids, labels).backward()
    (target,) = fgm._targets(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAdvWarning)
        gradient = target.gradient("torch", None, False, None)
    assert len(gradient.rows) == ids.unique().numel(), "back to the batch's rows"


# ------------------------------------------------------------ 7: nn.Embedding(scale_grad_by_freq=True)


def frequency_scaled_bag() -> BagOfEmbeddings:
    model = bag()
    model.emb.scale_grad_by_freq = True
    return model


def all_gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("method", ["fgm", "pgd.step"])
def test_a_frequency_scaled_table_is_attacked_as_the_snippet_attacks_it(backend, method, target):
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 20, (4, 13), generator=gen), torch.randint(0, 3, (4,), generator=gen)  # repeats

    def trained(run: Callable[[nn.Module, Callable], object]) -> torch.Tensor:
        model = frequency_scaled_bag()
        run(model, lambda: bag_loss(model, ids, labels))
        return all_gradients(model)

    if method == "fgm":
        want = trained(lambda model, closure: snippet_fgm_cycle(model, closure))
        got = trained(lambda model, closure: FGM(model, target=target).step(closure))
    else:
        want = trained(
            lambda model, closure: pgd_snippet_step(model, SnippetPGD(model), closure, steps=3, epsilon=1.0, alpha=0.3)
        )
        got = trained(lambda model, closure: PGD(model, 1.0, 0.3, steps=3, target=target).step(closure))
    assert ((got - want).norm() / want.norm()).item() <= 1e-6


def snippet_fgm_cycle(model: nn.Module, closure: Callable[[], torch.Tensor]) -> None:
    adversary = SnippetFGM(model)
    closure().backward()
    adversary.attack(1.0, "emb.")
    closure().backward()
    adversary.restore("emb.")


# ------------------------------------------------------------ 8: one NaN rule for every method

# The closure calls whose backward reaches .grad, per method: the adversarial pass (FGM, PGD with K=2: its third
# call), FreeLB's last pass, the penalized pass (exact: the only one; finite difference: the second).
LAST_CALL = {"fgm-weight": 2, "fgm-output": 2, "pgd": 3, "freelb": 2, "gp-exact": 1, "gp-fd": 2}
NAN_ADVERSARIES: dict[str, Callable[[nn.Module], object]] = {
    **ADVERSARIES,
    "pgd": lambda model: PGD(model, 0.05, 0.03, steps=2),
}


def grads_with_last_pass(method: str, last_pass: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list, object]:
    """The parameters' gradients after one step whose last pass's loss is ``last_pass(loss)``, and the adversary."""
    model = tiny_bert(attention="eager")
    adversary = NAN_ADVERSARIES[method](model)
    ids, labels = batches(1)[0]
    calls = []

    def closure():
        calls.append(None)
        loss = bert_loss(model, ids, labels)
        return last_pass(loss) if len(calls) == LAST_CALL[method] else loss

    adversary.step(closure)
    assert len(calls) == LAST_CALL[method], "the test's count of the passes is wrong"
    return [p.grad for p in model.parameters()], adversary


@pytest.mark.parametrize("method", list(NAN_ADVERSARIES))
def test_a_pass_with_a_non_finite_loss_drops_the_step_and_is_counted_once(backend, method):
    # The rule (fastadv.methods._finite): a step whose added pass is not finite gives .grad nothing, the clean
    # pass's gradient included: every gradient is zero, where the same step with a finite pass has gradients.
    poisoned, adversary = grads_with_last_pass(method, lambda loss: loss * float("inf"))
    finite, _ = grads_with_last_pass(method, lambda loss: loss)  # the same step, its pass finite
    assert any(g is not None and g.count_nonzero() for g in finite), "the finite step has no gradient to drop"
    for got, expected in zip(poisoned, finite, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.isfinite(got).all(), "a non-finite pass reached .grad"
            assert not got.count_nonzero(), "the step's gradient was not dropped whole"
    assert adversary.skipped_steps == 1
    model = adversary.model
    ids, labels = batches(1)[0]
    model.zero_grad()
    adversary.step(lambda: bert_loss(model, ids, labels))
    assert adversary.skipped_steps == 1, "a finite step was counted"


@pytest.mark.parametrize("method", ["fgm-weight", "fgm-output", "pgd", "freelb"])
def test_a_finite_loss_with_non_finite_gradients_leaves_grad_finite_and_is_counted(backend, method):
    def poisoned_gradient(loss: torch.Tensor) -> torch.Tensor:
        never = torch.zeros_like(loss, dtype=torch.bool)
        return loss + torch.where(never, loss * float("inf"), 0.0)  # finite value, NaN gradient

    grads, adversary = grads_with_last_pass(method, poisoned_gradient)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert adversary.skipped_steps == 1


@pytest.mark.parametrize("api", ["step", "attack-restore"])
def test_a_huge_epsilon_whose_adversarial_pass_overflows_leaves_grad_finite_and_is_counted(backend, api):
    model = BagOfEmbeddings()
    ids = batches(1)[0][0]
    fgm = FGM(model, epsilon=1e38)

    def overflowing_loss(model: BagOfEmbeddings) -> torch.Tensor:
        return model.head(model.emb(ids).sum(dim=1)).square().mean()  # rows of 1e38 summed and squared: Inf

    clean = copy.deepcopy(model)
    if api == "step":
        fgm.step(lambda: overflowing_loss(model))
    else:  # the user's own backward: fastadv never sees that loss, only its gradients
        overflowing_loss(model).backward()
        fgm.attack()
        adversarial = overflowing_loss(model)
        assert not torch.isfinite(adversarial), "the test's pass does not overflow"
        adversarial.backward()
        fgm.restore()
    overflowing_loss(clean).backward()
    for (name, p), q in zip(model.named_parameters(), clean.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: not restored"
        assert torch.isfinite(p.grad).all(), f"{name}: the overflow reached .grad"
        assert not p.grad.count_nonzero(), f"{name}: the overflowing step's gradient was not dropped whole"
        assert q.grad.count_nonzero(), f"{name}: the clean step has no gradient to drop"
    assert fgm.skipped_steps == 1


def test_a_table_resized_in_place_after_the_adversary_was_built_is_attacked_whole_and_restored():
    """transformers 5.25's resize_token_embeddings keeps the module and its parameter (issue 30, item 12: the
    docs said the next attack raised): the adversary attacks the resized table, the new ids' rows included."""
    model = tiny_bert()
    fgm = FGM(model)
    table = model.get_input_embeddings()
    rows = table.weight.shape[0]
    model.resize_token_embeddings(rows + 10, mean_resizing=False)
    assert model.get_input_embeddings() is table, "transformers replaced the module: this test is for in place"
    ids, labels = batches(1)[0]
    ids = ids.clone()
    ids[0, 0] = rows + 5  # a new id
    bert_loss(model, ids, labels).backward()
    before = table.weight.detach().clone()
    fgm.attack()
    moved = (table.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert rows + 5 in moved and all(r in ids.flatten().tolist() for r in moved)
    fgm.restore()
    assert torch.equal(table.weight, before)

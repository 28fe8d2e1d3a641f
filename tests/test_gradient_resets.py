"""The record of looked-up rows across gradient resets: zero_grad(set_to_none=False), in-place scaling
between micro-batches, PGD's restore_grad(), DDP writing its average. Bounded, and the numbers of
set_to_none=True and of the snippet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICE, relative_difference
from models import batches, bert_loss, tiny_bert
from torch import nn

from fastadv import FGM, PGD
from fastadv.snippets import SnippetFGM, SnippetPGD, pgd_snippet_step
from fastadv.targets.recorder import LookupRecorder

EMB = "word_embeddings"


def recorder(fgm: FGM, model: nn.Module) -> LookupRecorder:
    return fgm._recorders[id(model.get_input_embeddings().weight)]


def counting_checks(rec: LookupRecorder) -> list[int]:
    """A one-element list that counts the record's row checks (each a gradient change seen at a backward)."""
    calls = [0]
    check = rec._check_rows

    def counted(grad: torch.Tensor) -> None:
        calls[0] += 1
        check(grad)

    rec._check_rows = counted
    return calls


def train(
    model: nn.Module, adversary, data: list, set_to_none: bool, accumulate: int = 1, clip: float | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """FGM's loop with the snippet's calls. Returns the record's size after each micro-batch (FGM only)
    and each attack's perturbation of the table (the table after attack() minus before).

    ``clip``: clip_grad_norm_ after every micro-batch, so ``.grad`` is scaled in place between the
    micro-batches of an accumulation, which is no reset."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = recorder(adversary, model) if isinstance(adversary, FGM) else None
    table = model.get_input_embeddings().weight
    counts, deltas = [], []
    for i, (ids, labels) in enumerate(data):
        bert_loss(model, ids, labels).div(accumulate).backward()
        before = table.detach().clone()
        adversary.attack(1.0, EMB)
        deltas.append(table.detach() - before)
        bert_loss(model, ids, labels).div(accumulate).backward()
        adversary.restore(EMB)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if DEVICE == "cuda":  # the row checks are read once the device has run them: make that now
            torch.cuda.synchronize()
        if rec is not None:
            counts.append(rec.count)
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
    return counts, deltas


def test_set_to_none_false_keeps_the_record_bounded_and_trains_as_set_to_none_true(backend):
    base = tiny_bert()
    data = batches(30, repeats=False)
    runs = {}
    for set_to_none in (False, True):
        model = copy.deepcopy(base)
        fgm = FGM(model)
        checks = counting_checks(recorder(fgm, model))
        counts, deltas = train(model, fgm, data, set_to_none)
        runs[set_to_none] = (model, counts, checks[0], deltas)
    snippet = copy.deepcopy(base)
    _, snippet_deltas = train(snippet, SnippetFGM(snippet), data, set_to_none=False)

    (kept, kept_counts, kept_checks, deltas), (dropped, dropped_counts, dropped_checks, _) = runs[False], runs[True]
    per_step = dropped_counts[0]  # the clean and the adversarial pass's ids
    assert set(dropped_counts) == {per_step} and dropped_checks == 0
    # Each step's zeroing is seen at the next clean backward, and the previous step's rows, found zero,
    # go: on CPU at once, on CUDA once the device has run the check (then one step's ids more).
    assert max(kept_counts) <= (2 if DEVICE == "cuda" else 1) * per_step, f"the record grows: {kept_counts}"
    assert kept_checks == len(data) - 1, "one check per zeroing, none for the steps' own backward passes"
    table = base.get_input_embeddings().weight
    assert relative_difference(kept.get_input_embeddings().weight, table) > 1e-4, "training did not move the table"
    for i, (delta, want) in enumerate(zip(deltas, snippet_deltas, strict=True)):
        rel = relative_difference(delta, want)
        assert rel <= 1e-5, f"step {i}: the perturbation differs from the snippet's by {rel:.3g} (relative)"
    assert relative_difference(flat(kept), flat(dropped)) <= 1e-6
    assert relative_difference(flat(kept), flat(snippet)) <= 1e-6


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("set_to_none", [False, True], ids=["set_to_none=False", "set_to_none=True"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["accumulate", "accumulate-clip-between-micro-batches"])
def test_accumulation_equals_the_snippet(backend, set_to_none, clip):
    """Three micro-batches per step; with ``clip``, .grad is scaled in place after each (its version moves,
    its rows stay non-zero), and the next micro-batch's attack must still cover every earlier row."""
    base = tiny_bert()
    data = batches(9, repeats=False)
    ours, reference = copy.deepcopy(base), copy.deepcopy(base)
    fgm = FGM(ours)
    checks = counting_checks(recorder(fgm, ours))
    counts, deltas = train(ours, fgm, data, set_to_none, accumulate=3, clip=clip)
    _, reference_deltas = train(reference, SnippetFGM(reference), data, set_to_none, accumulate=3, clip=clip)
    for i, (delta, want) in enumerate(zip(deltas, reference_deltas, strict=True)):
        rel = relative_difference(delta, want)
        assert rel <= 1e-5, f"micro-batch {i}: the perturbation differs from the snippet's by {rel:.3g} (relative)"
    assert relative_difference(ours.get_input_embeddings().weight, base.get_input_embeddings().weight) > 1e-4
    whole = relative_difference(flat(ours), flat(reference))
    assert whole <= 1e-6, f"the weights differ from the snippet's by {whole:.3g} (relative)"
    per_micro_batch = counts[0]
    assert counts[:3] == [per_micro_batch, 2 * per_micro_batch, 3 * per_micro_batch], counts
    if clip is not None and not set_to_none:
        assert checks[0] > 0, "the in-place scaling was never seen: the test would prove nothing"


@pytest.mark.parametrize("set_to_none", [False, True], ids=["set_to_none=False", "set_to_none=True"])
def test_pgd_snippet_calls_under_accumulation_equal_the_snippet(backend, set_to_none):
    """The zero_grad() between PGD's attacks empties .grad and the record; restore_grad() puts back a
    gradient holding every micro-batch's rows so far, which the next micro-batch's attacks must cover."""
    base = tiny_bert()
    data = batches(6, repeats=False)
    runs = []
    for make in (lambda m: PGD(m, target="weight"), SnippetPGD):
        model = copy.deepcopy(base)
        adversary, table = make(model), model.get_input_embeddings().weight
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        moved = []  # the table after each attack, minus before the round's first
        for i, (ids, labels) in enumerate(data):
            clean = table.detach().clone()
            closure = lambda m=model, ids=ids, labels=labels: bert_loss(m, ids, labels) / 3  # noqa: E731
            after = lambda t, out=moved, table=table, clean=clean: out.append(table.detach() - clean)  # noqa: E731
            pgd_snippet_step(model, adversary, closure, 3, set_to_none, after, epsilon=0.05, alpha=0.03, emb_name=EMB)
            if (i + 1) % 3 == 0:
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)
        runs.append((moved, flat(model)))
    (moved, trained), (want_moved, want_trained) = runs
    for i, (got, want) in enumerate(zip(moved, want_moved, strict=True)):
        rel = relative_difference(got, want)
        assert rel <= 1e-5, f"attack {i % 3} of micro-batch {i // 3}: {rel:.3g} from the snippet's (relative)"
    assert relative_difference(trained, want_trained) <= 1e-6


# ---------------------------------------------------------------- DDP (gloo, 2 processes, CPU)


def ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Two micro-batches per step, both all-reduced: DDP writes the average into .grad at the end of
    every backward (a final callback of its own). That write must not read as a reset."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        data = batches(4, repeats=False, seed=10 + rank)
        for bucket_view in (False, True):
            for set_to_none in (False, True):
                model = DDP(tiny_bert(), gradient_as_bucket_view=bucket_view)
                fgm = FGM(model)
                rec = recorder(fgm, model.module)
                checks = counting_checks(rec)
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                per_step = []
                for ids, labels in data:
                    for _ in range(2):
                        model(input_ids=ids, labels=labels).loss.backward()
                        fgm.attack()
                        model(input_ids=ids, labels=labels).loss.backward()
                        fgm.restore()
                    per_step.append((checks[0], rec.count))
                    opt.step()
                    opt.zero_grad(set_to_none=set_to_none)
                result[(bucket_view, set_to_none)] = (per_step, flat(model))
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_ddp_writing_its_average_is_not_a_reset(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    ids_per_step = 4 * batches(1)[0][0].numel()  # 2 micro-batches x (clean + adversarial pass)
    for bucket_view in (False, True):
        kept, dropped = result[(bucket_view, False)], result[(bucket_view, True)]
        checks = [c for c, _ in kept[0]]
        if not bucket_view:  # one check per zeroing, at the next step's first backward; DDP's writes add none
            assert checks == list(range(len(checks))), checks
        # With bucket views .grad is a view of a bucket that other parameters' gradients share, and their
        # writes during backward move its version too: a check at every backward, the record still bounded.
        assert [n for _, n in kept[0]] == [ids_per_step] * len(checks), "the record is not one step's ids"
        assert [n for _, n in dropped[0]] == [ids_per_step] * len(checks)
        assert relative_difference(kept[1], dropped[1]) <= 1e-6

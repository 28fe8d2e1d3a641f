"""No buffer of the static (CUDA) path outgrows min(B*T, V) rows.

The static row sets keep a number of slots the host knows without a sync. Were it B*T, a batch of
128k tokens would save more rows than a 128k-row table holds; it is min(B*T, V), since a batch can
name no more distinct rows than it has ids or the table has rows. Tested with B*T > V: every
tensor that attack() and restore() create, with rows of the embedding's width, has at most
min(B*T, V) rows. (Per-position perturbations, share_rows=False, the gradient penalty and FreeLB,
hold one delta per token position by definition: B*T x d, like the activations themselves.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_verbose
from models import batches, bert_loss, tiny_bert
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastadv import FGM, PGD
from fastadv.ops import row_set_from_ids, segment_sum_by_id

VOCAB, HIDDEN = 23, 60  # 8 x 13 = 104 token positions per batch, more than the 23 rows of the table


class WidestNewBuffer(TorchDispatchMode):
    """Watches every op: the most rows of width ``d`` in a tensor an op newly made (views of its
    inputs and in-place results are not new memory), and which op made it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.rows, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if new and t.dim() >= 1 and t.shape[-1] == self.d and t.numel() // self.d > self.rows:
                self.rows, self.op = t.numel() // self.d, func
        return out


def test_the_watch_sees_a_buffer_of_every_position():
    """The check itself: an [N, d] copy made in the watched region is seen."""
    values = torch.randn(104, HIDDEN, device=DEVICE)
    with WidestNewBuffer(HIDDEN) as watch:
        values.view(8, 13, HIDDEN).reshape(-1, HIDDEN).add_(1.0)  # views and in place: nothing new
        assert watch.rows == 0
        values.index_select(0, torch.arange(104, device=DEVICE))
    assert watch.rows == 104


@pytest.mark.parametrize("n,distinct", [(200, 7), (200, 3), (5, 5)], ids=["all-rows", "few-rows", "short-batch"])
def test_static_row_set_has_min_of_ids_and_rows_slots(n, distinct):
    vocab = 7
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, distinct, (n,), generator=gen).to(DEVICE)
    ids[:distinct] = torch.arange(distinct, device=DEVICE)  # each of the `distinct` ids appears
    rs = row_set_from_ids(ids, vocab, static_shape=True)
    assert len(rs) == min(n, vocab)
    assert torch.equal(rs.rows[rs.first], torch.arange(distinct, device=DEVICE))
    assert torch.equal(rs.first, torch.arange(len(rs), device=DEVICE) < distinct), "distinct ids first"
    assert bool((rs.rows[~rs.first] == distinct - 1).all()), "the other slots repeat the largest id"


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("padding_idx", [None, 0], ids=["no-padding", "padding0"])
def test_static_segment_sums_have_min_of_ids_and_rows_rows(backend_name, padding_idx):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (8, 13), generator=gen).to(DEVICE)
    ids[:, 6:] = 0  # padding at more than half of all positions: the longest run
    values = torch.randn(ids.numel(), HIDDEN, generator=gen).to(DEVICE)
    rows, sums = segment_sum_by_id(values, ids, VOCAB, padding_idx, static_shape=True, backend=backend_name)
    assert sums.shape == (VOCAB, HIDDEN) and len(rows) == VOCAB
    dense = torch.zeros(VOCAB, HIDDEN, dtype=torch.float64, device=DEVICE).index_add_(
        0, ids.reshape(-1), values.double()
    )
    if padding_idx is not None:
        dense[padding_idx] = 0
    # Every slot, unflagged ones included, reads its row's sum through grad_rows.
    assert_close_verbose(sums[rows.grad_rows], dense[rows.rows], 1e-5, 1e-6, "segment sums on every slot")


def attack_cases():
    """(name, adversary factory, attack-and-restore in the watched region, after a clean backward)."""

    def fgm(target):
        def run(model, adversary, ids, labels, watch):
            with watch:
                adversary.attack()
                adversary.restore()

        return (lambda m: FGM(m, target=target)), run

    def pgd(target):
        def run(model, adversary, ids, labels, watch):
            with watch:
                adversary.attack(is_first_attack=True)
            model.zero_grad()
            bert_loss(model, ids, labels).backward()
            with watch:
                adversary.attack()
                adversary.restore()

        return (lambda m: PGD(m, 0.05, 0.03, target=target)), run

    return {
        "fgm-weight": fgm("weight"),
        "fgm-output": fgm("output"),
        "pgd-weight": pgd("weight"),
        "pgd-output": pgd("output"),
    }


@pytest.mark.parametrize("case", list(attack_cases()))
def test_attack_buffers_have_at_most_min_of_ids_and_rows_rows(backend, static_rows, case):
    make, run = attack_cases()[case]
    model = tiny_bert(vocab=VOCAB, hidden=HIDDEN)
    adversary = make(model)
    ids, labels = batches(1, vocab=VOCAB, batch=8, seq=13, repeats=False)[0]
    assert ids.numel() > VOCAB
    bert_loss(model, ids, labels).backward()
    watch = WidestNewBuffer(HIDDEN)
    run(model, adversary, ids, labels, watch)
    assert watch.op is not None, "attack() made no row buffer at all: the check would prove nothing"
    assert watch.rows <= min(ids.numel(), VOCAB), (
        f"{watch.op} made a buffer of {watch.rows} rows x {HIDDEN}, more than min(B*T, V) = min({ids.numel()}, {VOCAB})"
    )

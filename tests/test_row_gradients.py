"""A pass into a table whose .grad is dense adds the table's gradient as its rows: no V x d temporary,
and bit for bit torch's numbers on the CPU in fp32 (fastadv.ops.lookup, fastadv.targets.RowGradientHooks)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, dtype_id
from distributed_worker import train as train_with_calls
from measure import cpu_memory_events  # bench/measure.py (pyproject: pytest pythonpath)
from models import VOCAB, BagOfEmbeddings, batches, bert_loss, tiny_bert, tiny_gpt2
from sync_checks import host_syncs_forbidden

import fastadv.ops.lookup as lookup
from fastadv import FGM, PGD, FreeLB, GradientPenalty
from fastadv.ops import compact_ids, row_gradient_lookup
from fastadv.targets import ROW_GRADIENTS_VARIABLE, RowGradientHooks
from fastadv.targets.row_gradients import CPU_MIN_ROW_ELEMENTS, row_gradients_wanted

EXACT = DEVICE == "cpu"  # CUDA's sorted segment reduction may sum in another order: 1e-6 relative there


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    """Bitwise on the CPU; within ``rtol`` (relative, in norm) elsewhere."""
    if EXACT:
        assert torch.equal(actual, expected), f"{what}: not bitwise equal (max diff {(actual - expected).abs().max()})"
    else:
        diff = ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
        assert diff <= rtol, f"{what}: relative difference {diff:.3g} > {rtol}"


@pytest.fixture
def row_calls():
    """How many backward passes took the row path (calls of fastadv.ops.lookup.compact_ids), by table size."""
    calls: list[int] = []
    compact = lookup.compact_ids

    def counted(ids, num_rows, *args, **kwargs):
        calls.append(num_rows)
        return compact(ids, num_rows, *args, **kwargs)

    with mock.patch.object(lookup, "compact_ids", counted):
        yield calls


# ---------------------------------------------------------------- the op against torch's embedding


def op_case(vocab: int, dim: int, shape: tuple, high: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(0, high, shape, generator=gen).to(DEVICE)
    grad = torch.randn(vocab, dim, generator=gen).to(DEVICE, dtype)
    upstream = torch.randn(*shape, dim, generator=gen).to(DEVICE, dtype)
    return weight, ids, grad, upstream


def backward_into(weight, ids, grad, upstream, lookups, **options):
    """.grad after one backward of ``sum_k (k + 1) * lookup(weight, ids + k)`` starting from ``grad``."""
    w = weight.clone().requires_grad_()
    w.grad = None if grad is None else grad.clone()
    out = sum(lookups(w, ids + k, **options) * (k + 1) for k in range(options.pop("times", 1)))
    out.backward(upstream)
    return w.grad


def torch_lookup(w, ids, padding_idx=None, scale_grad_by_freq=False):
    return F.embedding(ids, w, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)


def row_lookup(w, ids, padding_idx=None, scale_grad_by_freq=False):
    return row_gradient_lookup(w, ids, padding_idx, scale_grad_by_freq)


OP_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"padding_idx": 3}, id="padding_idx"),
    pytest.param({"scale_grad_by_freq": True}, id="scale_grad_by_freq"),
    pytest.param({"padding_idx": 0, "scale_grad_by_freq": True}, id="padding-and-freq"),
]


@pytest.mark.parametrize("static_shape", [False, True], ids=["unique", "static"])
@pytest.mark.parametrize("times", [1, 2, 3], ids=lambda t: f"lookups{t}")
@pytest.mark.parametrize("options", OP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_rows_added_into_a_dense_grad_equal_torchs_backward(options, times, static_shape, dtype, monkeypatch):
    """V=50, d=37, ids [3, 11] drawn from 20 ids (heavy repeats), into a .grad that holds a gradient."""
    monkeypatch.setattr(
        lookup, "compact_ids", lambda ids, n, static_shape_=static_shape: compact_ids(ids, n, static_shape_)
    )
    weight, ids, grad, upstream = op_case(50, 37, (3, 11), 20, dtype)
    expected = backward_into(weight, ids, grad, upstream, torch_lookup, times=times, **options)
    actual = backward_into(weight, ids, grad, upstream, row_lookup, times=times, **options)
    assert actual.layout == torch.strided and actual.shape == weight.shape
    if dtype == torch.float32:
        assert_same(actual, expected, f"{options} x{times}")
    else:  # the same ops in the same order, in half precision: equal where torch's own path is
        assert torch.equal(actual, expected) if EXACT else torch.allclose(actual, expected, rtol=1e-2, atol=1e-2)


def test_without_a_grad_the_dense_gradient_becomes_grad():
    """The step's first pass: .grad is None, so the dense gradient torch gives is the one kept."""
    weight, ids, _, upstream = op_case(50, 37, (3, 11), 20, torch.float32)
    expected = backward_into(weight, ids, None, upstream, torch_lookup, padding_idx=2)
    actual = backward_into(weight, ids, None, upstream, row_lookup, padding_idx=2)
    assert actual.layout == torch.strided
    assert torch.equal(actual, expected)


def test_a_double_backward_gets_torchs_differentiable_gradient():
    """create_graph=True: the dense, differentiable form (a penalty on the weight's gradient works)."""
    weight, ids, grad, upstream = op_case(50, 37, (3, 11), 20, torch.float32)
    results = []
    for fn in (torch_lookup, row_lookup):
        w = weight.clone().requires_grad_()
        w.grad = grad.clone()
        (g,) = torch.autograd.grad((fn(w, ids) * upstream).sum() ** 2, w, create_graph=True)
        g.square().sum().backward()
        results.append((g.detach(), w.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


def test_compact_ids_static_form_names_every_id():
    ids = torch.tensor([[5, 3, 5, 9], [3, 3, 0, 9]], device=DEVICE)
    for static in (False, True):
        rows, slots, distinct = compact_ids(ids, 12, static_shape=static)
        assert torch.equal(rows[slots], ids)
        assert distinct is not static
        assert rows.numel() == (4 if not static else 8)
        assert torch.equal(rows[:4], torch.tensor([0, 3, 5, 9], device=DEVICE))


def test_the_row_path_syncs_nothing(row_calls):
    """The static form (CUDA's) under the host-sync guard: renumbering, sums, the sparse add."""
    weight, ids, grad, upstream = op_case(50, 37, (3, 11), 20, torch.float32)
    w = weight.clone().requires_grad_()
    w.grad = grad.clone()
    out = row_gradient_lookup(w, ids, 3, True)
    with mock.patch.object(lookup, "compact_ids", lambda i, n: compact_ids(i, n, static_shape=True)):
        with host_syncs_forbidden(DEVICE):
            out.backward(upstream)
    expected = backward_into(weight, ids, grad, upstream, torch_lookup, padding_idx=3, scale_grad_by_freq=True)
    assert_same(w.grad, expected, "static rows")


# ---------------------------------------------------------------- the hooks on a model


def test_modules_look_up_as_before(row_calls):
    """The hook remakes the output: same values, through the row lookup, only while .grad is dense."""
    model = BagOfEmbeddings(padding_idx=0).to(DEVICE)
    model.emb.max_norm = 1.5  # renormalized by the module's forward, before the hook
    ids = batches(1)[0][0]
    hooks = RowGradientHooks(model)
    first = model.emb(ids)
    assert first.grad_fn.name() == "EmbeddingBackward0", "no .grad yet: torch's lookup stays"
    first.sum().backward()
    again = model.emb(ids)
    assert "RowGradientLookup" in again.grad_fn.name()
    assert torch.equal(again, model.emb.weight.detach()[ids]), "the rows the module's forward renormalized"
    with torch.no_grad():
        assert model.emb(ids).grad_fn is None
    hooks.remove()
    assert model.emb(ids).grad_fn.name() == "EmbeddingBackward0", "remove() takes the hook off"


def test_several_fastadv_objects_share_one_hook():
    model = BagOfEmbeddings().to(DEVICE)
    a, b = RowGradientHooks(model), RowGradientHooks(model)
    assert len(model.emb._forward_hooks) == 1
    a.remove()
    assert len(model.emb._forward_hooks) == 1
    b.remove()
    assert len(model.emb._forward_hooks) == 0


def test_switched_off_by_the_environment(monkeypatch, row_calls):
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model)
    ids = batches(1)[0][0]
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    fgm.step(lambda: model(ids).sum())
    assert row_calls == []
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "1")
    model.zero_grad()
    fgm.step(lambda: model(ids).sum())
    assert row_calls == [VOCAB], "the adversarial pass, into the clean pass's dense .grad"
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "yes")
    with pytest.raises(ValueError, match="FASTADV_ROW_GRADIENTS='yes'"):
        fgm.step(lambda: model(ids).sum())


@pytest.mark.parametrize("value", ["auto", ""])
def test_by_default_a_small_cpu_table_is_left_to_torch_and_a_large_one_takes_the_rows(monkeypatch, value):
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, value)
    small = torch.zeros(CPU_MIN_ROW_ELEMENTS // 64 - 1, 64)
    large = torch.zeros(CPU_MIN_ROW_ELEMENTS // 64, 64)
    assert not row_gradients_wanted(small)
    assert row_gradients_wanted(large)
    assert row_gradients_wanted(small.to("meta")), "off the CPU every table takes the rows"
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "1")
    assert row_gradients_wanted(small)
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    assert not row_gradients_wanted(large)


def test_by_default_a_small_cpu_table_trains_through_torchs_backward(monkeypatch, row_calls):
    model = BagOfEmbeddings()
    assert model.emb.weight.numel() < CPU_MIN_ROW_ELEMENTS, "the test's table is not small"
    fgm = FGM(model)
    ids = batches(1)[0][0]
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "auto")
    fgm.step(lambda: model(ids).sum())
    assert row_calls == []


def test_left_to_torch_where_rows_do_not_apply(row_calls):
    """A module's own sparse gradient, tensor hooks on the weight, a frozen table, as many ids as rows."""
    ids = batches(1)[0][0]
    sparse = BagOfEmbeddings(sparse=True).to(DEVICE)
    FGM(sparse).step(lambda: sparse(ids).sum())
    assert sparse.emb.weight.grad.is_sparse
    hooked = BagOfEmbeddings().to(DEVICE)
    seen = []
    hooked.emb.weight.register_hook(lambda g: seen.append(g.layout))
    FGM(hooked).step(lambda: hooked(ids).sum())
    assert seen == [torch.strided, torch.strided], "tensor hooks get the dense gradient they expect"
    small = BagOfEmbeddings(vocab=ids.numel()).to(DEVICE)
    FGM(small).step(lambda: small(ids).sum())
    assert row_calls == []


def fresh(build):
    model = build()
    return model, copy.deepcopy(model)


def train(model, make, data, steps, set_to_none=True, accumulate=1, loss=bert_loss):
    adversary = make(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, (ids, labels) in enumerate(data[:steps]):
        adversary.step(lambda ids=ids, labels=labels: loss(model, ids, labels))
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
    return adversary


METHODS = {
    "fgm": FGM,
    "fgm-output": lambda m: FGM(m, target="output"),
    "fgm-positions": lambda m: FGM(m, target="output", share_rows=False),
    "pgd": lambda m: PGD(m, 0.05, 0.03),
    "freelb": lambda m: FreeLB(m, adv_lr=0.05, adv_steps=3, adv_max_norm=0.1),
    "gp": lambda m: GradientPenalty(m, 0.01),
}


@pytest.mark.parametrize("accumulate", [1, 2], ids=["no-accumulation", "accumulate2"])
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("method", METHODS)
def test_training_equals_the_dense_backward(method, set_to_none, accumulate, monkeypatch, row_calls):
    """4 steps of each method, rows (default) vs FASTADV_ROW_GRADIENTS=0: the same weights, bitwise on the CPU."""
    rows, dense = fresh(tiny_bert)
    data = batches(4)
    train(rows, METHODS[method], data, 4, set_to_none, accumulate)
    took_rows = sum(1 for n in row_calls if n == VOCAB)
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    train(dense, METHODS[method], data, 4, set_to_none, accumulate)
    for (name, a), b in zip(rows.named_parameters(), dense.parameters(), strict=True):
        assert_same(a.detach(), b.detach(), name, rtol=1e-5)
    # Passes into a dense .grad: all but a step's first when the gradients are set to None. The gradient
    # penalty's first pass is dL/de only, so with set_to_none and no accumulation none of its passes is.
    if method == "gp" and set_to_none and accumulate == 1:
        assert took_rows == 0
    else:
        assert took_rows > 0, "no pass took the row path: nothing was compared"


def test_plain_training_with_an_adversary_built_is_untouched(row_calls):
    """zero_grad() (set to None) each step, no attack: every pass is a step's first; torch's lookup stays."""
    model = tiny_bert()
    FGM(model), PGD(model), FreeLB(model), GradientPenalty(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for ids, labels in batches(3):
        bert_loss(model, ids, labels).backward()
        opt.step()
        opt.zero_grad()
    assert row_calls == []


@pytest.mark.parametrize("ours", [FGM, lambda m: PGD(m, 0.05, 0.03)], ids=["fgm", "pgd"])
def test_the_snippets_calls_take_the_rows_and_keep_their_numbers(ours, monkeypatch, row_calls):
    """The snippet's own loops on a model fastadv watches: the adversarial (FGM) and last (PGD) passes
    add rows, and the run is the one with torch's dense backward."""
    rows, dense = fresh(tiny_bert)
    data = batches(3)
    train_with_calls(rows, ours(rows), data, "calls")
    assert sum(1 for n in row_calls if n == VOCAB) == 3, "one pass per step adds into a dense .grad"
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    train_with_calls(dense, ours(dense), data, "calls")
    for (name, a), b in zip(rows.named_parameters(), dense.parameters(), strict=True):
        assert_same(a.detach(), b.detach(), name, rtol=1e-5)


def test_tied_table_is_correct(monkeypatch, row_calls):
    """GPT-2's input table is the LM head: autograd sums the head's dense gradient and the rows; same numbers."""

    def lm_loss(model, ids, labels):
        return model(input_ids=ids, labels=ids).loss

    rows, dense = fresh(tiny_gpt2)
    data = batches(3)
    with pytest.warns(Warning):
        train(rows, lambda m: FGM(m, target="weight"), data, 3, loss=lm_loss)
    assert row_calls, "the adversarial passes went through the row lookup"
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    with pytest.warns(Warning):
        train(dense, lambda m: FGM(m, target="weight"), data, 3, loss=lm_loss)
    for (name, a), b in zip(rows.named_parameters(), dense.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name


def table_allocations(fn, table_bytes: int) -> int:
    """How many allocations of ``table_bytes`` or more ``fn()`` makes (CPU profiler memory events)."""
    return sum(1 for nbytes in cpu_memory_events(fn) if nbytes >= table_bytes)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts CPU allocations (the GPU's peak is measured in bench/gpu.py)")
def test_the_adversarial_pass_allocates_no_table_sized_gradient(monkeypatch):
    """V = 20,000 rows of 64: the adversarial backward with rows allocates nothing of V x d; the dense
    backward allocates its V x d gradient (so the count can fail)."""
    vocab, dim = 20_000, 64
    model = BagOfEmbeddings(vocab=vocab, dim=dim).to(DEVICE)
    fgm = FGM(model)
    ids = torch.randint(0, vocab, (8, 32), device=DEVICE)
    counts = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, flag)
        model.zero_grad(set_to_none=True)
        model(ids).sum().backward()
        fgm.attack()
        loss = model(ids).sum()
        counts[flag] = table_allocations(loss.backward, vocab * dim * 4)
        fgm.restore()
    assert counts == {"1": 0, "0": 1}, counts


def test_compiled_model_compiles_once(row_calls):
    """torch.compile keeps torch's backward (no row path in a compiled graph) and recompiles nothing per step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_bert()
    compiled = torch.compile(model, backend="aot_eager")
    fgm = FGM(compiled)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)

    def step(ids, labels):
        fgm.step(lambda: bert_loss(compiled, ids, labels))
        opt.step()
        opt.zero_grad(set_to_none=False)  # .grad kept: every pass would take rows in eager

    for ids, labels in data[:2]:
        step(ids, labels)
    warm = dict(counters["stats"])
    for ids, labels in data[2:]:
        step(ids, labels)
    assert dict(counters["stats"]) == warm, f"recompiled after warm-up: {warm} -> {dict(counters['stats'])}"
    assert warm.get("unique_graphs", 0) > 0
    assert row_calls == []


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_cuda_form_trains_as_the_dense_backward(method, static_rows, monkeypatch, row_calls):
    """min(N, V) slots, uncoalesced, as on CUDA (static_rows), with .grad kept between steps."""
    rows, dense = fresh(tiny_bert)
    data = batches(3)
    train(rows, METHODS[method], data, 3, set_to_none=False)
    assert row_calls
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    train(dense, METHODS[method], data, 3, set_to_none=False)
    for (name, a), b in zip(rows.named_parameters(), dense.parameters(), strict=True):
        assert_same(a.detach(), b.detach(), name, rtol=1e-5)


def test_autograd_grad_of_the_table_gets_the_dense_gradient(row_calls):
    """torch.autograd.grad(loss, weight) while .grad is dense: the caller gets torch's dense tensor."""
    weight, ids, grad, upstream = op_case(50, 37, (3, 11), 20, torch.float32)
    expected = F.embedding(ids, weight.clone().requires_grad_())
    w = weight.clone().requires_grad_()
    w.grad = grad.clone()
    (got,) = torch.autograd.grad((row_gradient_lookup(w, ids) * upstream).sum(), w)
    (want,) = torch.autograd.grad((expected * upstream).sum(), expected.grad_fn.next_functions[0][0].variable)
    assert got.layout == torch.strided
    assert torch.equal(got, want)
    assert torch.equal(w.grad, grad), ".grad untouched"
    assert row_calls == []


class ScaledEmbedding(torch.nn.Embedding):
    """As Gemma's and BART's *ScaledWordEmbedding: the lookup times ``embed_scale``."""

    def __init__(self, *args, embed_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class PositionsFromShape(torch.nn.Embedding):
    """As BART's learned positions: called with another tensor, it looks up positions of its own."""

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.arange(like.shape[1], device=like.device))


def test_scaled_lookups_take_rows_and_other_forwards_are_left_alone(monkeypatch, row_calls):
    def build():
        torch.manual_seed(0)
        model = BagOfEmbeddings(padding_idx=0).to(DEVICE)
        model.emb = ScaledEmbedding(VOCAB, 123, padding_idx=0, embed_scale=2.5).to(DEVICE)
        model.positions = PositionsFromShape(64, 123).to(DEVICE)
        return model

    def loss(model, ids, labels):
        return model.head(torch.tanh(model.emb(ids) + model.positions(ids.float())).mean(dim=1)).logsumexp(-1).sum()

    rows, dense = fresh(build)
    data = batches(3)
    train(rows, lambda m: FGM(m, emb_name="emb."), data, 3, set_to_none=False, loss=loss)
    assert row_calls and set(row_calls) == {VOCAB}, "the scaled table takes rows; the positions are left to torch"
    monkeypatch.setenv(ROW_GRADIENTS_VARIABLE, "0")
    train(dense, lambda m: FGM(m, emb_name="emb."), data, 3, set_to_none=False, loss=loss)
    for (name, a), b in zip(rows.named_parameters(), dense.parameters(), strict=True):
        assert_same(a.detach(), b.detach(), name, rtol=1e-5)

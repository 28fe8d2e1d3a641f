"""The host side of a step: the aten ops one whole training step dispatches, and its host time where launches
dominate, for every fastadv method against the hand-written code it replaces (issue 29).

    python bench/host_cost.py                          # BERT 12 and 24 layers, Qwen2 2 and 4 layers; rows appended
    python bench/host_cost.py --methods fgm pgd --no-save
    python bench/host_cost.py --layers 12 --lm-layers --repeats 9
    python bench/host_cost.py --quick                  # BERT 2, 4 layers; Qwen2 1, 2; 3 repeats; nothing saved (CI)

On a GPU, a step of a BERT-size model is launch-bound: every aten op it dispatches costs host time, however
little the device does. Here the models are so narrow that the compute is negligible and the step's time is
its dispatch cost:

    bert   BertForSequenceClassification (bench/common.py's bert_classifier): V = 2,000, d = 32, L layers
           (default 12 and 24); batch 4 x 16 random ids, an all-ones attention mask, random labels
    qwen2  Qwen2ForCausalLM (bench/common.py's qwen2_lm): V = 32,000, d = 32, L layers (default 2 and 4),
           untied head; batch 4 x 16, labels = input_ids. FGM, PGD, VAT, SMART and R3F (and plain). Its 4 x 16 x
           32,000 logits are not negligible on a CPU: its host times are partly compute, its op counts are not

fp32, one thread (``torch.set_num_threads(1)``). Each method runs on two fresh models built from the same
seed, one for fastadv and one for the code it replaces:

    plain    one forward and backward, ``closure().backward()``: the "one pass" row
    fgm      FGM(model).step(closure)  vs  the copied snippet (fastadv.snippets.SnippetFGM) called as users
             do: backward, attack(1.0, "word_embeddings"), backward, restore("word_embeddings")
    pgd      PGD(model, epsilon=1.0, alpha=0.3, steps=3).step(closure)  vs  the snippet's loop
             (fastadv.snippets.pgd_snippet_step around SnippetPGD, K = 3)
    gp       GradientPenalty(model, 0.01, mode="finite_difference").step(closure)  vs  the finite difference
             on inputs_embeds: e = emb(ids), g = autograd.grad(L(e), e), then L(e + 0.01 g).backward()
    freelb   FreeLB(model, adv_lr=0.1, adv_steps=3, adv_init_mag=0.05, adv_max_norm=1.0).step(closure)  vs
             the published FreeLB loop on inputs_embeds (fastadv.snippets.freelb_snippet_step, l2)
    vat, smart, r3f   VAT/SMART/R3F(...).step(lambda: model(**batch)) with bench/consistency.py's arguments  vs
             its inputs_embeds references (reference_vat, reference_smart, reference_r3f); on the causal
             LM their KL averages over the token positions, as fastadv's does (the batch has no padding)

A step is ``model.zero_grad(set_to_none=True)`` then the method's passes; no optimizer step. zero_grad is
inside both the count and the timing, for every implementation alike; it dispatches no aten op.

- ops per step: every non-view aten op one whole step dispatches (``count_dispatched_ops``: a
  TorchDispatchMode, after 2 warm-up steps), forward, backward and the method's own; "beyond the reference"
  is fastadv's count minus its reference's; "beyond floor", for a step made only of full forward+backward
  passes, is the count minus their floor: passes x the plain step's ops, plus P ops (one ``add_`` per
  parameter: AccumulateGrad into an existing ``.grad``) for each pass that adds into the gradients of an
  earlier one (FGM 2 passes, 1 adding; the PGD snippet 4, 1: it sets them to None between attacks and
  puts the clean ones back before the last; FreeLB 3, 2).
- host ms: the median time of a step over ``--repeats``, all implementations of one model timed in turns
  (a b c .., .. c b a, ...), on ``--instances`` fresh pairs per method (3; built in alternating orders) and
  the median taken over the instances' medians: two copies of one model stepped alike differ by up to 5% on
  a CPU, by where their memory landed. The ratio is fastadv's median over its reference's.
- overhead(L) = ops of fastadv(L) - ops of its reference(L), at both depths, and its growth from the
  shallower to the deeper model: a handful at most when nothing of fastadv's grows with the parameter count;
  below zero where fastadv's inner passes skip the parameter gradients its reference computes (pgd.step,
  VAT, SMART). The ops behind the growth (or, without one, behind the overhead) are printed by name.

Rows (long form, bench/common.py's Layout): config model, layers, vocab, hidden, batch; metrics ops_per_step,
ops_beyond_reference, ops_beyond_floor, host_ms, ratio_to_reference, overhead_growth (fastadv's rows of the
deeper model), repeats; benchmark ``host_cost_<method>``, impl fastadv, reference or plain.

Before counting, one step of each pair from the same seed is compared: FGM's gradients must equal the
snippet's bitwise (fp32), PGD's, FreeLB's and the penalty's agree to 1e-5 relative, VAT's, SMART's and R3F's
to 1e-4 (bench/consistency.py's bound); the script exits non-zero before timing otherwise, so it cannot
compare different algorithms. Rows go to bench/results/host_cost.csv (``--no-save``, ``--quick``: none).

For a test (``bench`` on sys.path): ``from host_cost import count_dispatched_ops, steps_for``;
``fastadv_step, reference_step = steps_for("fgm", 2)``, ``count_dispatched_ops(fastadv_step)``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import consistency
from common import (
    RESULTS,
    Layout,
    append_rows,
    bert_classifier,
    fastadv_revision,
    interleaved_medians,
    load_average,
    load_note,
    log,
    parameter_gradients,
    provenance,
    qwen2_lm,
)
from measure import device_description

from fastadv import FGM, PGD, FreeLB, GradientPenalty
from fastadv.snippets import SnippetFGM, SnippetPGD, freelb_snippet_step, pgd_snippet_step

CSV_PATH = RESULTS / "host_cost.csv"
LAYOUT = Layout(
    config=("model", "layers", "vocab", "hidden", "batch"),
    metrics=(
        "ops_per_step",
        "ops_beyond_reference",
        "ops_beyond_floor",
        "host_ms",
        "ratio_to_reference",
        "overhead_growth",
        "repeats",
    ),
)
EPSILON, ALPHA, K = 1.0, 0.3, 3  # FGM, PGD
GP_EPSILON = 0.01
FREELB = {"adv_lr": 0.1, "adv_steps": K, "adv_init_mag": 0.05, "adv_max_norm": 1.0}
SEED = 1  # the random draws of both implementations in the agreement check
Step = Callable[[], object]


# ---------------------------------------------------------------- counting


class _OpCounter(TorchDispatchMode):
    """Counts every non-view aten op dispatched inside the mode, per op (``aten.mm.default``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(step: Step, warmup: int = 2) -> collections.Counter[str]:
    """The non-view aten ops one call of ``step()`` dispatches, counted per op name (e.g. ``aten.mm.default``);
    ``sum(counts.values())`` is the step's total. ``step`` runs ``warmup`` times uncounted first (the first
    steps of a method may check or build what later ones reuse). Forward, backward (autograd's engine
    runs the mode too) and everything between are counted; views (``view``, ``detach``, ``t``, ...) are not.
    The calls run on one intra-op thread (restored after): the count does not depend on it, and on a CPU shared
    with other jobs a multithreaded op waits for the busy core (seconds per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            step()
        with _OpCounter() as counter:
            step()
    finally:
        torch.set_num_threads(threads)
    return counter.counts


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model and its batch: ``kind`` "bert" (sequence classification) or "qwen2" (causal LM)."""

    kind: str
    layers: int
    vocab: int
    hidden: int = 32
    batch: int = 4
    seq: int = 16
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # of the model's weights (bench/gpu.py's host part: bf16)

    @property
    def emb_name(self) -> str:
        """The snippet's emb_name for this model."""
        return "word_embeddings" if self.kind == "bert" else "embed_tokens"

    @property
    def label(self) -> str:
        return (
            f"{self.kind}, {self.layers} layers (V = {self.vocab:,}, d = {self.hidden}, batch {self.batch}x{self.seq})"
        )

    def build(self) -> torch.nn.Module:
        """A fresh random model, the same weights every call (seed 0)."""
        device = torch.device(self.device)
        if self.kind == "bert":
            model = bert_classifier(self.vocab, self.hidden, self.layers, self.seq, device).train()
        else:
            model = qwen2_lm(self.vocab, self.hidden, self.layers, 4 * self.hidden, self.seq, device)
        return model.to(self.dtype)

    def make_batch(self) -> dict[str, torch.Tensor]:
        """Random ids (seed 1), an all-ones attention mask, random labels (bert) or the ids (qwen2)."""
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, self.vocab, (self.batch, self.seq), generator=gen)
        labels = torch.randint(0, 2, (self.batch,), generator=gen) if self.kind == "bert" else ids.clone()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {key: value.to(self.device) for key, value in batch.items()}


def bert_spec(layers: int, device: str = "cpu") -> ModelSpec:
    return ModelSpec("bert", layers, vocab=2000, device=device)


def qwen2_spec(layers: int, device: str = "cpu") -> ModelSpec:
    return ModelSpec("qwen2", layers, vocab=32000, device=device)


# ---------------------------------------------------------------- references


def reference_gradient_penalty(model: torch.nn.Module, batch: dict, epsilon: float = GP_EPSILON) -> None:
    """The finite-difference penalty on inputs_embeds: dL/de of a clean pass (no parameter gradients), then one
    pass at ``e + epsilon * dL/de`` backpropagated (docs/methods.md's formula)."""
    rest = {"attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    e = model.get_input_embeddings()(batch["input_ids"])
    (g,) = torch.autograd.grad(model(inputs_embeds=e, **rest).loss, e)
    model(inputs_embeds=e + epsilon * g, **rest).loss.backward()


def reference_freelb(model: torch.nn.Module, batch: dict, **config: float) -> torch.Tensor:
    """The published FreeLB step on inputs_embeds (fastadv.snippets.freelb_snippet_step, the tests' reference), l2
    norm, on a batch dict. Returns the summed loss."""
    return freelb_snippet_step(model, batch["input_ids"], batch["attention_mask"], batch["labels"], **config)


def per_position_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position (every dimension but the last), their mean: bench/consistency.py's ``kl`` for
    B x C logits, and for a causal LM's B x T x C the per-token mean fastadv takes (no padding here)."""
    per = F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), reduction="none", log_target=True)
    return per.sum(-1).mean()


@contextlib.contextmanager
def _kl_per_position() -> Iterator[None]:
    """bench/consistency.py's references with their KL taken per position (its ``kl`` divides by B alone)."""
    if not callable(getattr(consistency, "kl", None)):
        raise RuntimeError("bench/consistency.py has no kl() for its references to use: adapt host_cost.py")
    saved, consistency.kl = consistency.kl, per_position_kl
    try:
        yield
    finally:
        consistency.kl = saved


# ---------------------------------------------------------------- the pairs


@dataclass(frozen=True)
class Method:
    """How a method's two implementations are built, and how closely their gradients must agree.

    ``fastadv`` and ``reference`` take (model, batch, spec) and return the step's passes; ``passes`` is, for
    fastadv's and the reference's step, (full forward+backward passes, those of them adding into ``.grad``
    an earlier pass left), or None where the step holds other passes (a dL/de-only backward, a no-grad
    forward, two forwards into one backward).
    ``tolerance``: the largest relative gradient difference accepted; 0.0 demands bitwise equality.
    """

    fastadv: Callable[[torch.nn.Module, dict, ModelSpec], Step]
    reference: Callable[[torch.nn.Module, dict, ModelSpec], Step]
    passes: tuple[tuple[int, int] | None, tuple[int, int] | None]
    tolerance: float
    kinds: tuple[str, ...] = ("bert",)


def _loss(model: torch.nn.Module, batch: dict) -> Callable[[], torch.Tensor]:
    return lambda: model(**batch).loss


def _plain(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    return lambda: model(**batch).loss.backward()


def _snippet_fgm(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    snippet, closure = SnippetFGM(model), _loss(model, batch)

    def run() -> None:
        closure().backward()
        snippet.attack(EPSILON, spec.emb_name)
        closure().backward()
        snippet.restore(spec.emb_name)

    return run


def _fgm(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    fgm, closure = FGM(model, epsilon=EPSILON), _loss(model, batch)
    return lambda: fgm.step(closure)


def _snippet_pgd(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    snippet, closure = SnippetPGD(model), _loss(model, batch)
    return lambda: pgd_snippet_step(model, snippet, closure, K, epsilon=EPSILON, alpha=ALPHA, emb_name=spec.emb_name)


def _pgd(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    pgd, closure = PGD(model, epsilon=EPSILON, alpha=ALPHA, steps=K), _loss(model, batch)
    return lambda: pgd.step(closure)


def _reference_gp(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    return lambda: reference_gradient_penalty(model, batch, GP_EPSILON)


def _gp(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    gp, closure = GradientPenalty(model, GP_EPSILON, mode="finite_difference"), _loss(model, batch)
    return lambda: gp.step(closure)


def _reference_freelb(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    return lambda: reference_freelb(model, batch, **FREELB)


def _freelb(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
    freelb, closure = FreeLB(model, **FREELB), _loss(model, batch)
    return lambda: freelb.step(closure, attention_mask=batch["attention_mask"])


def _consistency_pair(name: str) -> tuple[Callable, Callable]:
    """fastadv's VAT/SMART/R3F and bench/consistency.py's reference, with that script's arguments."""
    make, reference, _ = consistency.METHODS[name]

    def ours(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
        adversary = make(model)
        return lambda: adversary.step(lambda: model(**batch), attention_mask=batch["attention_mask"])

    def theirs(model: torch.nn.Module, batch: dict, spec: ModelSpec) -> Step:
        if spec.kind == "bert":
            return lambda: reference(model, batch)

        def run() -> None:
            with _kl_per_position():
                reference(model, batch)

        return run

    return ours, theirs


METHODS: dict[str, Method] = {
    "plain": Method(_plain, _plain, ((1, 0), (1, 0)), 0.0, ("bert", "qwen2")),
    "fgm": Method(_fgm, _snippet_fgm, ((2, 1), (2, 1)), 0.0, ("bert", "qwen2")),
    # pgd.step's inner passes take dL/de alone
    "pgd": Method(_pgd, _snippet_pgd, (None, (K + 1, 1)), 1e-5, ("bert", "qwen2")),
    "gp": Method(_gp, _reference_gp, (None, None), 1e-5),  # the clean pass takes dL/de alone
    "freelb": Method(_freelb, _reference_freelb, ((K, K - 1), (K, K - 1)), 1e-5),
    **{
        name: Method(*_consistency_pair(name), (None, None), 1e-4, ("bert", "qwen2"))
        for name in ("vat", "smart", "r3f")
    },
}


@dataclass
class Pair:
    """A method's two implementations on two equal fresh models: each step is zero_grad(set_to_none=True),
    then the passes (gradients left in .grad)."""

    method: str
    spec: ModelSpec
    fastadv_model: torch.nn.Module
    reference_model: torch.nn.Module
    fastadv: Step
    reference: Step


def _with_zero_grad(model: torch.nn.Module, passes: Step) -> Step:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        passes()

    return step


def build_pair(method: str, spec: ModelSpec) -> Pair:
    """``method``'s fastadv step and reference step (see METHODS) on two fresh models of ``spec``, one batch."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    m = METHODS[method]
    if spec.kind not in m.kinds:
        raise ValueError(f"{method} runs on {', '.join(m.kinds)} here, not {spec.kind}")
    batch = spec.make_batch()
    ours, theirs = spec.build(), spec.build()
    return Pair(
        method, spec, ours, theirs,
        _with_zero_grad(ours, m.fastadv(ours, batch, spec)),
        _with_zero_grad(theirs, m.reference(theirs, batch, spec)),
    )  # fmt: skip


def steps_for(method: str, layers: int, model: str = "bert") -> tuple[Step, Step]:
    """``(fastadv_step, reference_step)``: one whole step each (zero_grad(set_to_none=True), then the passes;
    no optimizer step) of ``method`` (a key of METHODS: plain, fgm, pgd, gp, freelb, vat, smart, r3f) on two
    fresh equal models with ``layers`` layers, ``model`` "bert" (V = 2,000, d = 32) or "qwen2" (V = 32,000,
    d = 32; vat, smart, r3f and plain), batch 4 x 16. For "plain" both are the plain step."""
    spec = {"bert": bert_spec, "qwen2": qwen2_spec}[model](layers)
    pair = build_pair(method, spec)
    return pair.fastadv, pair.reference


def agreement(pair: Pair) -> tuple[float, bool]:
    """One step of each implementation from the same seed: (relative difference of the parameter gradients in
    fp64, whether they are bitwise equal). The models must start equal (fresh)."""
    torch.manual_seed(SEED)
    pair.fastadv()
    torch.manual_seed(SEED)
    pair.reference()
    named = [dict(m.named_parameters()) for m in (pair.fastadv_model, pair.reference_model)]
    have = [{n for n, p in params.items() if p.grad is not None} for params in named]
    if have[0] != have[1]:
        return float("inf"), False
    bitwise = all(torch.equal(named[0][n].grad, named[1][n].grad) for n in have[0])
    ours, theirs = parameter_gradients(pair.fastadv_model), parameter_gradients(pair.reference_model)
    return ((ours - theirs).norm() / theirs.norm()).item(), bitwise


# ---------------------------------------------------------------- the benchmark


@dataclass
class Measured:
    """One implementation on one model: its op counts (per op) and median host seconds."""

    method: str
    impl: str  # "fastadv", "reference" or "plain"
    counts: collections.Counter[str]
    steady: bool  # a second counted step dispatched the same ops
    seconds: float = float("nan")

    @property
    def ops(self) -> int:
        return sum(self.counts.values())

    @property
    def key(self) -> str:
        return "plain" if self.impl == "plain" else f"{self.method} {self.impl}"


@dataclass
class ModelRun:
    """Every implementation measured on one model: by key ("plain", "fgm fastadv", ...), with the number of
    parameters a plain step gives a gradient (P, see the floor) and a note (the agreement, the load)."""

    spec: ModelSpec
    measured: dict[str, Measured]
    parameters: int
    note: str

    def beyond_reference(self, entry: Measured) -> int | None:
        reference = self.measured.get(f"{entry.method} reference") if entry.impl == "fastadv" else None
        return None if reference is None else entry.ops - reference.ops

    def ratio(self, entry: Measured) -> float | None:
        reference = self.measured.get(f"{entry.method} reference") if entry.impl == "fastadv" else None
        return None if reference is None else entry.seconds / reference.seconds

    def beyond_floor(self, entry: Measured) -> int | None:
        """Ops beyond the floor of a step made only of full passes: passes x plain + adding passes x P."""
        passes = METHODS[entry.method].passes[0 if entry.impl == "fastadv" else 1]
        plain = self.measured.get("plain")
        if plain is None or passes is None or entry.impl == "plain":
            return None
        full, adding = passes
        return entry.ops - full * plain.ops - adding * self.parameters

    def overhead(self, method: str) -> collections.Counter[str]:
        """overhead(L): fastadv's op counts minus its reference's, per op (negative where fastadv has fewer)."""
        diff = collections.Counter(self.measured[f"{method} fastadv"].counts)
        diff.subtract(self.measured[f"{method} reference"].counts)
        return diff


def measure_model(
    spec: ModelSpec, methods: list[str], repeats: int, enforce_agreement: bool = True, instances: int = 1
) -> ModelRun:
    """Check, count and time every method (with plain first) on ``spec``; exits when a pair disagrees (unless
    ``enforce_agreement`` is False: bf16 on a GPU, where the snippet's bf16 norm and fastadv's fp32 one round
    apart; the difference is then only logged).

    ``instances``: the pairs built per method for the timing, all timed in turns; an implementation's time is
    the median of its instances' medians. Two fresh copies of one model, stepped alike, differ by up to 5% on
    a CPU (where their memory landed): one pair per method would report that as fastadv's cost or gain."""
    log(f"{spec.label}: building and checking {', '.join(methods)}")
    pairs = {name: build_pair(name, spec) for name in methods}
    failures, agreed = [], []
    for name, pair in pairs.items():
        if name == "plain":
            continue
        diff, bitwise = agreement(pair)
        tolerance = METHODS[name].tolerance
        ok = bitwise if tolerance == 0.0 else diff <= tolerance
        verdict = "bitwise equal" if bitwise else f"relative difference {diff:.3g}"
        log(f"  {name}: gradients of fastadv and the reference: {verdict} ({'ok' if ok else 'MISMATCH'})")
        agreed.append(f"{name} {'bitwise' if bitwise else f'{diff:.2g}'}")
        if not ok:
            failures.append(f"{name} ({verdict}, allowed {'bitwise' if tolerance == 0.0 else tolerance})")
    if failures and enforce_agreement:
        raise SystemExit(f"{spec.label}: fastadv and its reference disagree for {', '.join(failures)}: not timing")
    steps: dict[str, Step] = {}
    measured: dict[str, Measured] = {}
    for name, pair in pairs.items():
        impls = [("fastadv", pair.fastadv), ("reference", pair.reference)]
        if name == "plain":
            impls = [("plain", pair.reference)]
        for impl, step in impls:
            counts = count_dispatched_ops(step)
            entry = Measured(name, impl, counts, steady=count_dispatched_ops(step, warmup=0) == counts)
            if not entry.steady:
                log(f"  {entry.key}: a second step dispatched other ops than the first ({entry.ops} counted)")
            measured[entry.key], steps[entry.key] = entry, step
    plain_model = pairs["plain"].reference_model  # its last step was plain's: which parameters it reached
    parameters = sum(1 for p in plain_model.parameters() if p.grad is not None)
    copies = {f"{key}#0": step for key, step in steps.items()}
    for i in range(1, instances):  # more pairs, built in another order (the first built land elsewhere)
        for name in reversed(methods) if i % 2 else methods:
            pair = build_pair(name, spec)
            impls = [("plain", pair.reference)] if name == "plain" else [("fastadv", pair.fastadv)]
            impls += [] if name == "plain" else [("reference", pair.reference)]
            copies |= {f"{'plain' if impl == 'plain' else f'{name} {impl}'}#{i}": step for impl, step in impls}
    before = load_average()
    medians = interleaved_medians(copies, torch.device(spec.device), repeats)
    for key in measured:
        measured[key].seconds = statistics.median(v for k, v in medians.items() if k.rsplit("#", 1)[0] == key)
    note = f"P={parameters}; {instances} instance(s) each; agreement: {', '.join(agreed) or '-'}; {load_note(before)}"
    return ModelRun(spec, measured, parameters, note)


def _signed(value: int | None) -> str:
    return "-" if value is None else f"{value:+d}"


def print_table(run: ModelRun, repeats: int) -> None:
    """The model's table: ops per step, beyond the reference and the floor, host ms, fastadv / reference."""
    device = device_description(torch.device(run.spec.device))
    print(f"\n{run.spec.label}, {device}; P = {run.parameters} parameters; host ms: median of {repeats} in turns")
    header = f"{'impl':<18}{'ops/step':>10}{'beyond ref':>12}{'beyond floor':>14}{'host ms':>10}{'ratio':>8}"
    print(header + "\n" + "-" * len(header))
    for entry in run.measured.values():
        ratio = run.ratio(entry)
        print(
            f"{entry.key:<18}{entry.ops:>10}{_signed(run.beyond_reference(entry)):>12}"
            f"{_signed(run.beyond_floor(entry)):>14}{entry.seconds * 1e3:>10.2f}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>8}{'' if entry.steady else '  (unsteady)'}"
        )
    print(flush=True)


def print_overheads(kind: str, runs: list[ModelRun]) -> dict[str, int]:
    """overhead(L) per method at each depth, its growth from the first depth to the last, and the ops behind
    the growth (or, without growth, behind the overhead). Returns the growth by method."""
    present = {entry.method for entry in runs[0].measured.values()} - {"plain"}
    methods = [m for m in METHODS if m in present]
    if not methods:
        return {}
    print(f"{kind}: overhead(L) = ops of fastadv(L) - ops of the reference(L)")
    depths = "".join(f"{f'L={run.spec.layers}':>10}" for run in runs)
    print(f"{'method':<8}{depths}{'growth':>10}  ops behind the growth (else the overhead), by op")
    growths = {}
    for method in methods:
        per_depth = [run.overhead(method) for run in runs]
        totals = [sum(diff.values()) for diff in per_depth]
        growths[method] = growth = totals[-1] - totals[0]
        behind = collections.Counter(per_depth[-1])
        if growth:
            behind.subtract(per_depth[0])
        top = sorted(((n, c) for n, c in behind.items() if c), key=lambda item: -abs(item[1]))[:4]
        ops = ", ".join(f"{name.removeprefix('aten.')} {count:+d}" for name, count in top) or "-"
        print(f"{method:<8}" + "".join(f"{t:>+10d}" for t in totals) + f"{growth:>+10d}  {ops}")
    print(flush=True)
    return growths


def result_rows(run: ModelRun, repeats: int, growths: dict[str, int] | None) -> list[dict]:
    """One row per implementation; ``growths`` (the deepest model of its kind only): each method's overhead growth."""
    spec = run.spec
    base = provenance(torch.device(spec.device)) | {
        "model": spec.kind, "layers": spec.layers, "vocab": spec.vocab, "hidden": spec.hidden,
        "batch": f"{spec.batch}x{spec.seq}", "repeats": repeats,
    }  # fmt: skip
    rows = []
    for entry in run.measured.values():
        row = base | {
            "benchmark": f"host_cost_{entry.method}", "impl": entry.impl, "ops_per_step": entry.ops,
            "host_ms": f"{entry.seconds * 1e3:.4g}",
            "notes": f"{fastadv_revision()}; {str(spec.dtype).removeprefix('torch.')}; 1 thread; "
            "zero_grad(set_to_none=True) in each step, no optimizer step; "
            f"{'' if entry.steady else 'ops unsteady between steps; '}{run.note}",
        }  # fmt: skip
        extra = {
            "ops_beyond_floor": run.beyond_floor(entry),
            "ops_beyond_reference": run.beyond_reference(entry),
            "ratio_to_reference": None if run.ratio(entry) is None else f"{run.ratio(entry):.4f}",
            "overhead_growth": None if entry.impl != "fastadv" or growths is None else growths.get(entry.method),
        }
        rows.append(row | {key: value for key, value in extra.items() if value is not None})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "plain"], default=None,
                        help="a subset, in any order (plain always runs); default all")  # fmt: skip
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="BERT depths (default 12 24)")
    parser.add_argument("--lm-layers", type=int, nargs="*", default=None, help="Qwen2 depths (default 2 4; none: skip)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per implementation, in turns")
    parser.add_argument("--instances", type=int, default=3, help="fresh pairs per method, timed in turns (default 3)")
    parser.add_argument("--device", default="cpu", help="default cpu (on cuda the time is host + device)")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    parser.add_argument("--quick", action="store_true", help="BERT 2, 4 layers; Qwen2 1, 2; 3 repeats; nothing saved")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    chosen = args.methods or [m for m in METHODS if m != "plain"]
    methods = [m for m in METHODS if m == "plain" or m in chosen]
    layers = args.layers if args.layers is not None else ([2, 4] if args.quick else [12, 24])
    lm_layers = args.lm_layers if args.lm_layers is not None else ([1, 2] if args.quick else [2, 4])
    repeats = 3 if args.quick else args.repeats
    instances = 1 if args.quick else args.instances
    log(f"{fastadv_revision()}; {device_description(torch.device(args.device))}; {', '.join(methods)}")
    rows = []
    for kind, depths, make in (("bert", layers, bert_spec), ("qwen2", lm_layers, qwen2_spec)):
        kind_methods = [m for m in methods if kind in METHODS[m].kinds]
        if not depths or kind_methods == ["plain"]:
            continue
        runs = []
        for depth in sorted(set(depths)):
            runs.append(measure_model(make(depth, args.device), kind_methods, repeats, instances=instances))
            print_table(runs[-1], repeats)
        growths = print_overheads(kind, runs)
        for run in runs:
            rows += result_rows(run, repeats, growths if run is runs[-1] and len(runs) > 1 else None)
    if args.quick or args.no_save:
        log("nothing saved")
    else:
        append_rows(rows, CSV_PATH, LAYOUT)
        log(f"appended {len(rows)} rows to {CSV_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

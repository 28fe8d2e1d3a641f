"""What one training step costs with each method, against a plain step, timed in turns in one process.

    python bench/step_cost.py                  # both shapes below, CPU: 1 thread (--threads), rows appended
    python bench/step_cost.py --shapes e5      # one shape
    python bench/step_cost.py --quick          # tiny shapes, every step once, nothing saved (CI)

Shapes (random weights from configs, nothing downloaded), fp32 on the CPU:

    e5     BertForSequenceClassification at multilingual-e5-small's shape: V = 250,000, d = 384,
           12 layers; batch 16 x 32
    qwen2  Qwen2ForCausalLM: V = 151,936, d = 512, 2 layers, untied head; batch 4 x 128

Steps, each followed by fused AdamW's step (``AdamW(fused=True)``, Trainer's ``adamw_torch_fused``)
and ``zero_grad()``:

    plain              forward + backward on a model no fastadv object has touched
    plain+adversaries  the same on the model that carries the FGM, PGD, FreeLB and gradient-penalty
                       objects below, built and not attacking: what fastadv costs a step it sits out
    snippet            the copied FGM snippet (fastadv.snippets.SnippetFGM), on the untouched model
    floor              FGM's two passes with nothing that grows with V in the second: a clean pass, then
                       one with the table frozen (no table gradient at all), on the untouched model. The
                       bar "fgm (rows)" is held to: its second pass adds U rows, this one none
    fgm, pgd, freelb, gp   FGM.step, PGD.step (K = 3), FreeLB.step (K = 3), GradientPenalty.step
                       (finite difference), each twice: "rows" (the default: a pass into a table whose
                       .grad is dense adds the table's gradient as its rows) and "dense"
                       (FASTADV_ROW_GRADIENTS=0: torch's dense embedding backward, fastadv before it)

Per step: the median time over the repeats, all steps timed in turns (a b c .., .. c b a, ...); the
ratio to plain's median; the peak memory above the start of the step; and, on the CPU, how many
allocations of V x d elements or more it made (the table's gradient, the snippet's copies).
Before timing, the two models start equal and one step's gradients are compared: the snippet's
against fastadv FGM's, and FGM's with rows against FGM's dense (both must be bitwise equal on the
CPU in fp32; the script exits non-zero otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
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
    provenance,
    qwen2_lm,
    release,
)
from measure import cpu_memory_events, device_description, peak_memory_bytes, peak_of

from fastadv import FGM, PGD, FreeLB, GradientPenalty
from fastadv.snippets import SnippetFGM
from fastadv.targets.row_gradients import ROW_GRADIENTS_VARIABLE

CSV_PATH = RESULTS / "step_cost.csv"
LAYOUT = Layout(
    config=("shape", "vocab", "dim", "layers", "batch", "row_gradients"),
    metrics=("median_s", "x_plain", "repeats", "peak_bytes", "vxd_allocations"),
    benchmark="step_cost",
)
EPSILON, ALPHA, K = 1.0, 0.3, 3
FREELB = {"adv_lr": 0.1, "adv_steps": K, "adv_max_norm": 1.0}
GP_EPSILON = 0.01
LR = 1e-5


@dataclass(frozen=True)
class Shape:
    """A model shape and its batch: ``tokens`` = (batch, sequence)."""

    name: str
    kind: str  # "bert" (sequence classification) or "qwen2" (causal LM)
    vocab: int
    hidden: int
    layers: int
    tokens: tuple[int, int]
    emb_name: str  # the snippet's emb_name for this model

    def build(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        seq = self.tokens[1]
        if self.kind == "bert":
            return bert_classifier(self.vocab, self.hidden, self.layers, seq, device).to(dtype).train()
        return qwen2_lm(self.vocab, self.hidden, self.layers, 4 * self.hidden, seq, device, dtype)

    def batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        """A fixed batch of uniform random ids (seed 1)."""
        batch, seq = self.tokens
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.vocab, (batch, seq), generator=gen)
        labels = torch.randint(0, 2, (batch,), generator=gen) if self.kind == "bert" else ids
        return {"input_ids": ids.to(device), "labels": labels.to(device)}


SHAPES = {
    "e5": Shape("e5", "bert", 250_000, 384, 12, (16, 32), "word_embeddings"),
    "qwen2": Shape("qwen2", "qwen2", 151_936, 512, 2, (4, 128), "embed_tokens"),
}
QUICK_SHAPES = {
    "e5": Shape("e5", "bert", 3_001, 48, 2, (4, 16), "word_embeddings"),
    "qwen2": Shape("qwen2", "qwen2", 2_003, 64, 1, (2, 24), "embed_tokens"),
}


UNTOUCHED = ("plain", "snippet", "floor")  # the steps run on the model no fastadv object has touched


@contextlib.contextmanager
def row_gradients(enabled: bool) -> Iterator[None]:
    """FASTADV_ROW_GRADIENTS set to 1 or 0 inside the block (fastadv reads it at each lookup)."""
    before = os.environ.get(ROW_GRADIENTS_VARIABLE)
    os.environ[ROW_GRADIENTS_VARIABLE] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ROW_GRADIENTS_VARIABLE]
        else:
            os.environ[ROW_GRADIENTS_VARIABLE] = before


class Steps:
    """Two equal models: ``plain`` (never touched by fastadv: the plain and snippet steps) and ``adv``
    (carrying FGM, PGD, FreeLB and GradientPenalty), each with its fused AdamW."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        self.shape = shape
        self.plain = shape.build(device, dtype)
        self.adv = copy.deepcopy(self.plain)
        self.batch = shape.batch(device)
        fused = {"fused": True}
        self.optimizers = {
            id(self.plain): torch.optim.AdamW(self.plain.parameters(), lr=LR, **fused),
            id(self.adv): torch.optim.AdamW(self.adv.parameters(), lr=LR, **fused),
        }
        self.snippet = SnippetFGM(self.plain)
        self.fgm = FGM(self.adv, EPSILON)
        self.pgd = PGD(self.adv, EPSILON, ALPHA, K)
        self.freelb = FreeLB(self.adv, **FREELB)
        self.gp = GradientPenalty(self.adv, GP_EPSILON)

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        return model(**self.batch).loss

    def passes(self, impl: str) -> None:
        """The forward and backward passes of one step of ``impl`` (gradients left in .grad)."""
        model = self.plain if impl in UNTOUCHED else self.adv
        closure = lambda: self.loss(model)  # noqa: E731
        if impl in ("plain", "plain+adversaries"):
            closure().backward()
        elif impl == "floor":
            closure().backward()
            table = model.get_input_embeddings().weight
            table.requires_grad_(False)
            try:
                closure().backward()
            finally:
                table.requires_grad_(True)
        elif impl == "snippet":
            closure().backward()
            self.snippet.attack(EPSILON, self.shape.emb_name)
            closure().backward()
            self.snippet.restore(self.shape.emb_name)
        else:
            getattr(self, impl).step(closure)

    def step(self, impl: str, rows: bool = True) -> Callable[[], None]:
        """One whole training step of ``impl``: passes, optimizer step, zero_grad()."""
        model = self.plain if impl in UNTOUCHED else self.adv
        optimizer = self.optimizers[id(model)]

        def run() -> None:
            with row_gradients(rows):
                self.passes(impl)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    def gradients(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    def check_agreement(self) -> dict[str, float]:
        """On the two equal models, before any step: the snippet's step gradients vs fastadv FGM's, and
        FGM's with rows vs dense. Returns the max relative difference of each (0.0: bitwise equal)."""
        out = {}
        self.passes("snippet")
        snippet = self.gradients(self.plain)
        self.plain.zero_grad(set_to_none=True)
        with row_gradients(False):
            self.passes("fgm")
        dense = self.gradients(self.adv)
        self.adv.zero_grad(set_to_none=True)
        with row_gradients(True):
            self.passes("fgm")
        rows = self.gradients(self.adv)
        self.adv.zero_grad(set_to_none=True)
        out["snippet vs fgm"] = max_relative_difference(rows, snippet)
        out["fgm rows vs dense"] = max_relative_difference(rows, dense)
        return out


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||b|| (fp64); 0.0 exactly when every pair is bitwise equal."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if torch.equal(x, y):
            continue
        diff = (x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)
        worst = max(worst, diff.item())
    return worst


def step_memory(fn: Callable[[], None], device: torch.device, large: int) -> tuple[int, int | None]:
    """(peak bytes above the start of ``fn()``, allocations of ``large`` bytes or more: CPU only, else None)."""
    if device.type == "cuda":
        return peak_memory_bytes(fn, device), None
    events = cpu_memory_events(fn)
    return peak_of(events), sum(1 for nbytes in events if nbytes >= large)


IMPLS = [  # (impl, row_gradients)
    ("plain", True),
    ("plain+adversaries", True),
    ("snippet", True),
    ("floor", True),
    *[(m, rows) for m in ("fgm", "pgd", "freelb", "gp") for rows in (True, False)],
]


def label(impl: str, rows: bool) -> str:
    return (
        impl
        if impl in ("plain", "plain+adversaries", "snippet", "floor")
        else f"{impl} ({'rows' if rows else 'dense'})"
    )


def bench_shape(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int, quick: bool) -> list[dict]:
    log(f"{shape.name}: V={shape.vocab} d={shape.hidden} layers={shape.layers} batch={shape.tokens}, {dtype}")
    steps = Steps(shape, device, dtype)
    agreement = steps.check_agreement()
    for what, diff in agreement.items():
        log(f"  {what}: {'bitwise equal' if diff == 0 else f'max relative difference {diff:.3g}'}")
    exact = device.type == "cpu" and dtype == torch.float32
    if exact and agreement["fgm rows vs dense"] != 0:
        raise SystemExit("FGM's gradients with rows differ from the dense backward's: they must be bitwise equal")
    fns = {label(impl, rows): steps.step(impl, rows) for impl, rows in IMPLS}
    for fn in fns.values():  # warm-up: optimizer states, allocator, the first lookups' checks
        fn()
    load = load_average()
    times = interleaved_medians(fns, device, repeats)
    load = load_note(load)
    table_bytes = shape.vocab * shape.hidden * torch.finfo(dtype).bits // 8
    memory = {name: step_memory(fn, device, table_bytes) for name, fn in fns.items()}
    plain = times["plain"]
    base = provenance(device) | {
        "shape": shape.name, "vocab": shape.vocab, "dim": shape.hidden, "layers": shape.layers,
        "batch": f"{shape.tokens[0]}x{shape.tokens[1]}", "repeats": repeats,
    }  # fmt: skip
    notes = (
        f"{dtype}; AdamW(fused=True) lr={LR}; snippet vs fgm grads max rel diff {agreement['snippet vs fgm']:.3g}; "
        f"fgm rows vs dense {agreement['fgm rows vs dense']:.3g}; {load}"
    )
    rows = []
    for impl, rows_on in IMPLS:
        name = label(impl, rows_on)
        peak, large = memory[name]
        rows.append(
            base | {"impl": impl, "row_gradients": int(rows_on), "median_s": f"{times[name]:.6g}"}
            | {"x_plain": f"{times[name] / plain:.3f}", "peak_bytes": peak, "notes": notes}
            | {"vxd_allocations": "" if large is None else large}
        )  # fmt: skip
    print_table(shape, rows)
    del steps
    release(device)
    return rows


def print_table(shape: Shape, rows: list[dict]) -> None:
    """The Markdown table of one shape (the README's)."""
    print(f"\n{shape.name}: V = {shape.vocab:,}, d = {shape.hidden}, {shape.layers} layers, batch {rows[0]['batch']}")
    print("\n| step | median | x plain | peak of one step | V x d allocations |\n|---|---|---|---|---|")
    for row in rows:
        name = label(row["impl"], bool(row["row_gradients"]))
        median_ms, peak_mib = float(row["median_s"]) * 1e3, row["peak_bytes"] / 2**20
        large = "" if row["vxd_allocations"] == "" else row["vxd_allocations"]
        print(f"| {name} | {median_ms:.0f} ms | {float(row['x_plain']):.2f}x | {peak_mib:.0f} MiB | {large} |")
    print(flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="e5,qwen2", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1: steadier)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, nothing saved")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}: choose from {', '.join(shapes)}")
    log(f"{fastadv_revision()} on {device_description(device)}")
    rows = []
    for name in names:
        rows += bench_shape(shapes[name], device, torch.float32, 1 if args.quick else args.repeats, args.quick)
    if args.quick:
        log("--quick: nothing saved")
        return
    append_rows(rows, CSV_PATH, LAYOUT)
    log(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    sys.exit(main())

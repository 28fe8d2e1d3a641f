"""Thousands of attack cycles per method on random shapes: memory stays flat and the weights end bitwise clean.

A leak of a few KiB per step (a hook never removed, a record never trimmed, a saved row never freed) or a
restore that misses a row once in a thousand shapes shows only over a long run. This runs each method's
cycle ``--cycles`` times on its own copy of a random BERT, each cycle on a batch of random shape
(B x T drawn from 1..8 x 1..32, random ids, so rows repeat within and across batches), with no optimizer
step, so every cycle must leave the weights exactly where they started:

    fgm           FGM's snippet calls (attack, backward, restore), target='auto' (the weight's rows)
    fgm_output    the same with target='output' (the lookups' output, in forward hooks)
    pgd           PGD's snippet loop (backup_grad, K attacks, restore_grad, restore), K = 3
    pgd_step      PGD.step(closure), K = 3
    freelb        FreeLB.step(closure), K = 3
    gp            GradientPenalty.step(closure), finite difference
    vat, smart, r3f   VAT.step, SMART.step (K = 3 each), R3F.step; their closure returns the model's output
    smart_proximal    SMART.step with its momentum teacher (each step's teacher forward swaps the weights' .data)

Each cycle starts with ``zero_grad()``, set to None or zeroed in place at random (older scripts do the
latter). Per method it reports the process's resident memory after the warm-up cycles and at the end, the
largest record of looked-up ids any cycle left (its bound: the recorder's compaction threshold), the
steps the method skipped, and whether the weights at the end are bitwise those at the start. It exits
non-zero when the weights moved, a step was skipped, the record passed its bound, or (full runs only:
a short run's allocator has not settled) the resident memory grew by more than max(16 MiB, 5%) after the
warm-up.

The backend is fastadv's choice for the device: the torch path on the CPU, the Triton kernels on CUDA
(or on CPU tensors under TRITON_INTERPRET=1, slowly: use --cycles there).

    python bench/soak.py                 # 5,000 cycles per method; appends rows to bench/results/soak.csv
    python bench/soak.py --methods fgm pgd --cycles 20000
    python bench/soak.py --quick         # 60 cycles per method of a smaller model, prints only (CI)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch
from common import RESULTS, Layout, append_rows, bert_classifier, fastadv_revision, log, provenance
from measure import device_description
from record_growth import resident_bytes

from fastadv import FGM, PGD, R3F, SMART, VAT, FreeLB, GradientPenalty

CSV_PATH = RESULTS / "soak.csv"
LAYOUT = Layout(
    config=("vocab", "dim", "layers", "cycles", "warmup_cycles", "max_batch", "max_seq"),
    metrics=(
        "rss_after_warmup_bytes",
        "rss_end_bytes",
        "rss_growth_bytes",
        "max_recorded_ids",
        "recorded_ids_bound",
        "skipped_steps",
        "weights_bitwise_equal",
        "seconds",
    ),
)
METHODS = ("fgm", "fgm_output", "pgd", "pgd_step", "freelb", "gp", "vat", "smart", "smart_proximal", "r3f")
EPSILON, ALPHA, K = 1.0, 0.3, 3
RSS_SLACK_BYTES, RSS_SLACK_FRACTION = 16 * 2**20, 0.05
Batch = dict[str, torch.Tensor]


def build(method: str, model: torch.nn.Module) -> tuple[object, Callable[[Batch], None]]:
    """The method's object on ``model`` and one cycle of it on a batch: every pass, every restore."""
    loss = lambda batch: model(**batch).loss  # noqa: E731

    if method in ("fgm", "fgm_output"):
        fgm = FGM(model, EPSILON, target="output" if method == "fgm_output" else "auto")

        def fgm_cycle(batch: Batch) -> None:
            loss(batch).backward()
            fgm.attack()
            loss(batch).backward()
            fgm.restore()

        return fgm, fgm_cycle
    if method in ("pgd", "pgd_step"):
        pgd = PGD(model, EPSILON, ALPHA, K)

        def pgd_cycle(batch: Batch) -> None:
            loss(batch).backward()
            pgd.backup_grad()
            for t in range(K):
                pgd.attack(is_first_attack=t == 0)
                if t != K - 1:
                    model.zero_grad()
                else:
                    pgd.restore_grad()
                loss(batch).backward()
            pgd.restore()

        return pgd, pgd_cycle if method == "pgd" else lambda batch: pgd.step(lambda: loss(batch))
    if method == "freelb":
        freelb = FreeLB(model, adv_lr=0.1, adv_steps=K, adv_init_mag=0.05)
        return freelb, lambda batch: freelb.step(lambda: loss(batch))
    if method == "gp":
        gp = GradientPenalty(model, 0.01)
        return gp, lambda batch: gp.step(lambda: loss(batch))
    if method in ("vat", "smart", "smart_proximal", "r3f"):
        makers = {
            "vat": lambda: VAT(model, epsilon=EPSILON, power_iterations=K),
            "smart": lambda: SMART(model, epsilon=0.05, step_size=0.02, noise_var=0.01, steps=K),
            "smart_proximal": lambda: SMART(
                model, epsilon=0.05, step_size=0.02, noise_var=0.01, steps=K, proximal_weight=1.0
            ),
            "r3f": lambda: R3F(model, epsilon=0.1),
        }
        term = makers[method]()
        return term, lambda batch: term.step(lambda: model(**batch))
    raise ValueError(f"unknown method {method!r}: choose from {METHODS}")


def recorded_ids(adversary: object) -> tuple[int, int]:
    """The ids the adversary's recorders hold now (all tables) and their bound: the sum of the points at
    which each recorder compacts its record. (0, 0) for methods without a recorder (FreeLB, the penalty)."""
    recorders = getattr(adversary, "_recorders", {}).values()
    return sum(r.count for r in recorders), sum(r.compact_at for r in recorders)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def soak(method: str, base: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """``args.cycles`` cycles of ``method`` on a copy of ``base``; what they left (see the module docstring)."""
    model = copy.deepcopy(base)
    adversary, cycle = build(method, model)
    start_weights = weights(model)
    gen = torch.Generator().manual_seed(METHODS.index(method))
    max_ids, bound, rss_warm = 0, 0, 0
    start = time.perf_counter()
    for i in range(args.cycles):
        b = int(torch.randint(1, args.max_batch + 1, (), generator=gen))
        t = int(torch.randint(1, args.max_seq + 1, (), generator=gen))
        batch = {
            "input_ids": torch.randint(0, args.vocab, (b, t), generator=gen).to(device),
            "labels": torch.randint(0, 2, (b,), generator=gen).to(device),
        }
        model.zero_grad(set_to_none=bool(torch.randint(0, 2, (), generator=gen)))
        cycle(batch)
        count, bound = recorded_ids(adversary)
        max_ids = max(max_ids, count)
        if i == args.warmup - 1:
            rss_warm = resident_bytes()
    seconds = time.perf_counter() - start
    rss_end = resident_bytes()
    equal = all(torch.equal(a, p.detach()) for a, p in zip(start_weights, model.parameters(), strict=True))
    return {
        "impl": method,
        "rss_after_warmup_bytes": rss_warm,
        "rss_end_bytes": rss_end,
        "rss_growth_bytes": rss_end - rss_warm,
        "max_recorded_ids": max_ids,
        "recorded_ids_bound": bound,
        "skipped_steps": adversary.skipped_steps,
        "weights_bitwise_equal": int(equal),
        "seconds": f"{seconds:.1f}",
    }


def failures(row: dict, judge_memory: bool) -> list[str]:
    """What of ``row`` breaks the soak's promises (empty when nothing does)."""
    found = []
    if not row["weights_bitwise_equal"]:
        found.append("the weights moved")
    if row["skipped_steps"]:
        found.append(f"{row['skipped_steps']} steps skipped")
    if row["max_recorded_ids"] > row["recorded_ids_bound"]:
        found.append(f"the record reached {row['max_recorded_ids']} ids, above its bound {row['recorded_ids_bound']}")
    slack = max(RSS_SLACK_BYTES, RSS_SLACK_FRACTION * row["rss_after_warmup_bytes"])
    if judge_memory and row["rss_growth_bytes"] > slack:
        found.append(f"resident memory grew {row['rss_growth_bytes'] / 2**20:.1f} MiB after the warm-up")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--cycles", type=int, default=5000, help="cycles per method")
    p.add_argument("--warmup", type=int, default=None, help="cycles before the first memory reading (default 10%%)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    p.add_argument("--quick", action="store_true", help="60 cycles per method of a smaller model, nothing saved")
    p.add_argument("--no-save", action="store_true", help="print only: no CSV rows")
    args = p.parse_args(argv)
    if args.quick:
        args.cycles, args.vocab, args.hidden = 60, 3000, 32
    args.warmup = args.warmup if args.warmup is not None else max(1, args.cycles // 10)
    if not 0 < args.warmup < args.cycles:
        p.error("--warmup must be at least 1 and below --cycles")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    desc = device_description(device)
    shape = f"BERT {args.layers}x{args.hidden}, V={args.vocab}, batches up to {args.max_batch}x{args.max_seq}"
    log(f"{shape}, {args.cycles} cycles per method, warm-up {args.warmup}; {desc}; {fastadv_revision()}")
    base = bert_classifier(args.vocab, args.hidden, args.layers, args.max_seq, device)
    rows, broken = [], {}
    for method in args.methods:
        row = soak(method, base, args, device)
        rows.append(row)
        broken[method] = failures(row, judge_memory=not args.quick)
        log(
            f"  {method}: {row['seconds']} s, RSS {row['rss_after_warmup_bytes'] / 2**20:.1f} -> "
            f"{row['rss_end_bytes'] / 2**20:.1f} MiB, max recorded ids {row['max_recorded_ids']}"
            f" (bound {row['recorded_ids_bound']}), skipped {row['skipped_steps']}, weights "
            f"{'bitwise equal' if row['weights_bitwise_equal'] else 'MOVED'}"
        )

    print(f"\nSoak, {args.cycles} cycles per method, {shape}, on {desc}:")
    print(f"{'method':>12}{'RSS growth MiB':>16}{'max ids':>9}{'skipped':>9}{'weights':>16}  verdict")
    for row in rows:
        verdict = "; ".join(broken[row["impl"]]) or "clean"
        weights_note = "bitwise equal" if row["weights_bitwise_equal"] else "moved"
        print(
            f"{row['impl']:>12}{row['rss_growth_bytes'] / 2**20:>16.2f}{row['max_recorded_ids']:>9}"
            f"{row['skipped_steps']:>9}{weights_note:>16}  {verdict}"
        )
    if args.quick:
        print("(--quick: resident memory not judged; too few cycles for the allocator to settle)")
    if not args.quick and not args.no_save:
        config = {
            "vocab": args.vocab, "dim": args.hidden, "layers": args.layers, "cycles": args.cycles,
            "warmup_cycles": args.warmup, "max_batch": args.max_batch, "max_seq": args.max_seq,
        }  # fmt: skip
        notes = f"no optimizer step; zero_grad set_to_none at random; {torch.get_num_threads()} threads"
        result = [provenance(device) | {"benchmark": "soak"} | config | row | {"notes": notes} for row in rows]
        append_rows(result, CSV_PATH, LAYOUT)
        log(f"appended {len(result)} rows to {CSV_PATH}")
    return 1 if any(broken.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

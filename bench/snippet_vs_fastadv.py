"""The copied FGM snippet vs fastadv.FGM, side by side in one run, per vocabulary size.

Measures, for each vocabulary size V:

a. attack+restore time on an nn.Embedding(V, d) after a clean backward of a 32 x 128 batch
   (median over repeats; each timed call leaves the weight restored, which is checked), after
   checking once that both attacks give the same weights (max relative diff <= 1e-5);
b. extra memory of attack() (CPU: bytes allocated by the call; CUDA: peak above the baseline);
c. one whole training step of a small random BertForSequenceClassification (1 layer) with AdamW:
   snippet, fastadv, and a plain step without adversary (the floor).

Prints a table, appends rows to bench/results/fgm.csv (never overwriting) and draws
bench/results/fgm_<cpu|cuda>.png.

    python bench/snippet_vs_fastadv.py                      # V = 32000 128000 256000, d = 768 (CPU) / 4096 (CUDA)
    python bench/snippet_vs_fastadv.py --vocab 32000 --repeats 3
    python bench/snippet_vs_fastadv.py --quick              # small smoke run, saves nothing
    python bench/snippet_vs_fastadv.py --threads 1          # CPU shared with other jobs: see below

On a CPU that other jobs share, torch's intra-op threads wait on each other at every op (several
ms per op when a core is taken), which hits fastadv's many small row ops far harder than the
snippet's few whole-table passes; ``--threads 1`` gives steadier numbers there. The thread count
is part of the device column, and each row's notes keep the load average around its timing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    SHAPE_LAYOUT,
    append_rows,
    fastadv_revision,
    interleaved_medians,
    load_average,
    load_note,
    log,
    provenance,
    relative_grad_difference,
    release,
)
from fgm_cases import BATCH, EPSILON, SEQ, make_attack_case
from measure import device_description, environment, extra_memory_bytes

from fastadv import FGM
from fastadv.snippets import SnippetFGM

CSV_PATH = RESULTS / "fgm.csv"
TRAIN_BATCH, TRAIN_SEQ = 8, 128
TRAIN_EMB_NAME = "word_embeddings"


# ---------------------------------------------------------------- a + b: attack + restore, memory


def bench_attack(
    vocab: int,
    dim: int,
    device: torch.device,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    batch: int = BATCH,
    seq: int = SEQ,
) -> dict:
    """Attack+restore time (median of ``repeats``, in turns) and attack's extra memory, snippet vs fastadv,
    on an nn.Embedding(vocab, dim) in ``dtype`` after the clean backward of a batch x seq batch of random ids."""
    log(f"attack+restore V={vocab} d={dim} {str(dtype).removeprefix('torch.')}: two copies and the clean backward")
    case = make_attack_case(vocab, dim, device, batch, seq, dtype=dtype)
    agree = case.agreement()
    distinct = torch.unique(case.ids).numel()
    tolerance = "1e-5" if dtype == torch.float32 else f"{torch.finfo(dtype).eps:.2g}, one rounding"
    log(
        f"  agreement after attack: max rel diff {agree['max_rel_diff']:.2e} (<= {tolerance}), perturbation norm "
        f"{agree['perturbation_norm']:.6f}, {int(agree['changed_rows'])} of {distinct} batch rows changed by "
        f"fastadv; the perturbations themselves differ by {agree['delta_rel_diff']:.1e} (relative, norm)"
    )
    load = load_average()
    times = interleaved_medians({"snippet": case.snippet_pair, "fastadv": case.fastadv_pair}, device, repeats)
    snippet_s, fastadv_s = times["snippet"], times["fastadv"]
    case.check_restored()  # every timed call was an attack+restore pair: the weights must be back, bitwise
    load = load_note(load)
    log(f"  snippet attack+restore: {snippet_s * 1e3:.2f} ms (median of {repeats}, timed in turns with fastadv)")
    log(f"  fastadv attack+restore: {fastadv_s * 1e3:.2f} ms (median of {repeats}), backend {case.fgm.backend}")

    snippet_mem = extra_memory_bytes(case.snippet_attack, device)
    case.snippet_restore()
    fastadv_mem = extra_memory_bytes(case.fastadv_attack, device)
    case.fastadv_restore()
    case.check_restored()
    log(f"  extra memory of attack: snippet {snippet_mem / 2**20:.1f} MiB, fastadv {fastadv_mem / 2**20:.1f} MiB")
    result = {
        "vocab": vocab,
        "dim": dim,
        "snippet_s": snippet_s,
        "fastadv_s": fastadv_s,
        "snippet_mem": snippet_mem,
        "fastadv_mem": fastadv_mem,
        "rows": distinct,
        "notes": (
            f"fastadv backend={case.fgm.backend}; agreement max_rel_diff={agree['max_rel_diff']:.2e} "
            f"(perturbations: {agree['delta_rel_diff']:.1e}); "
            f"distinct rows={distinct} ({int(agree['changed_rows'])} changed); ids uniform in [0,V); {load}"
        ),
    }
    del case
    release(device)
    return result


# ---------------------------------------------------------------- c: whole training step


def make_bert(vocab: int, hidden: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, TRAIN_SEQ),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)  # random weights, nothing downloaded
    return model.to(device).train()


class Trainer:
    """One model, its AdamW, and how a step perturbs it: 'plain', 'snippet' or 'fastadv'."""

    def __init__(self, model: torch.nn.Module, impl: str, batch: dict[str, torch.Tensor]) -> None:
        self.model, self.impl, self.batch = model, impl, batch
        # fastadv must hook the model before the forward pass whose gradient it uses.
        self.fgm = FGM(model) if impl == "fastadv" else None
        self.snippet = SnippetFGM(model) if impl == "snippet" else None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def backward(self) -> None:
        """zero_grad, clean forward/backward and, unless plain, attack, adversarial forward/backward, restore."""
        self.optimizer.zero_grad()
        self.model(**self.batch).loss.backward()
        if self.impl == "plain":
            return
        if self.fgm is not None:
            self.fgm.attack(EPSILON)
        else:
            self.snippet.attack(EPSILON, TRAIN_EMB_NAME)
        self.model(**self.batch).loss.backward()
        if self.fgm is not None:
            self.fgm.restore()
        else:
            self.snippet.restore(TRAIN_EMB_NAME)

    def step(self) -> None:
        self.backward()
        self.optimizer.step()


def bench_train(vocab: int, hidden: int, device: torch.device, repeats: int, batch_size: int) -> dict:
    log(f"train step V={vocab} hidden={hidden}: building 1-layer BERT x3 (plain, snippet, fastadv)")
    base = make_bert(vocab, hidden, device)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, vocab, (batch_size, TRAIN_SEQ), generator=gen).to(device),
        "attention_mask": torch.ones(batch_size, TRAIN_SEQ, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=gen).to(device),
    }
    trainers = {impl: Trainer(copy.deepcopy(base), impl, batch) for impl in ("plain", "snippet", "fastadv")}
    del base
    # Same weights, same batch: the adversarial gradients of snippet and fastadv must agree.
    trainers["snippet"].backward()
    trainers["fastadv"].backward()
    grad_diff = relative_grad_difference(trainers["fastadv"].model, trainers["snippet"].model)
    assert grad_diff <= 1e-4, f"snippet and fastadv training gradients disagree: relative diff {grad_diff:.3g}"
    log(f"  agreement of the step's gradients (clean + adversarial): relative diff (norm) {grad_diff:.2e}")
    load = load_average()
    times = interleaved_medians({impl: t.step for impl, t in trainers.items()}, device, repeats)
    load = load_note(load)
    for impl, seconds in times.items():
        log(f"  {impl:8s} step: {seconds * 1e3:.1f} ms (median of {repeats}, the three timed in turns)")
    params = sum(p.numel() for p in trainers["plain"].model.parameters())
    del trainers
    release(device)
    notes = (
        f"BertForSequenceClassification 1 layer hidden={hidden} params={params}; AdamW dense over all params "
        f"(table included) for every impl; grad agreement rel_diff_norm={grad_diff:.2e}; {load}"
    )
    return {"vocab": vocab, "dim": hidden, "times": times, "notes": notes}


# ---------------------------------------------------------------- output


def plot(attack: list[dict], device: torch.device, title_device: str, dim: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocab = [r["vocab"] for r in attack]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (
        (ax_t, "snippet_s", "fastadv_s", 1e3, "attack + restore time (ms)", "ms"),
        (ax_m, "snippet_mem", "fastadv_mem", 1 / 2**20, "extra memory of attack (MiB)", "MiB"),
    )

    def label(value: float, unit: str) -> str:
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"

    for ax, s_key, f_key, scale, ylabel, unit in panels:
        s = [r[s_key] * scale for r in attack]
        f = [max(r[f_key], 1e-12) * scale for r in attack]
        ax.plot(vocab, s, "o-", color="tab:red", label="copied snippet")
        ax.plot(vocab, f, "s-", color="tab:blue", label="fastadv.FGM")
        for x, ys, yf in zip(vocab, s, f, strict=True):
            for y in (ys, yf):
                ax.annotate(label(y, unit), (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
            ax.annotate(
                f"{ys / yf:.1f}x" if ys / yf < 10 else f"{ys / yf:.0f}x",
                (x, (ys * yf) ** 0.5),
                ha="center",
                va="center",
                fontsize=9,
                fontweight="bold",
                color="dimgray",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(vocab)
        ax.set_xticklabels([f"{v // 1000}k" for v in vocab])
        ax.minorticks_off()
        ax.margins(x=0.1)
        ax.set_xlabel(f"vocabulary size V (embedding V x {dim})")
        ax.set_ylabel(ylabel)
        lo, hi = min(f), max(s)
        ax.set_ylim(lo / 3, hi * 4)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
    ax_t.set_title("time (median); bold: snippet / fastadv", fontsize=10)
    if device.type == "cpu":
        ax_m.set_title("bytes allocated by attack() (CPU: a sum, not a peak)", fontsize=10)
    else:
        ax_m.set_title("peak memory above the baseline during attack()", fontsize=10)
    fig.suptitle(f"FGM snippet vs fastadv, batch {BATCH}x{SEQ} random ids: {title_device}", fontsize=11)
    fig.tight_layout()
    path = RESULTS / f"fgm_{device.type}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_tables(attack: list[dict], train: list[dict], desc: str) -> None:
    print(f"\nattack + restore on {desc} (batch {BATCH}x{SEQ}, median seconds; memory of attack):", flush=True)
    print(f"{'V':>8} {'d':>5} {'snippet ms':>11} {'fastadv ms':>11} {'ratio':>7}", end="")
    print(f" {'snip MiB':>9} {'fast MiB':>9} {'ratio':>7}")
    for r in attack:
        mem_ratio = r["snippet_mem"] / r["fastadv_mem"] if r["fastadv_mem"] > 0 else float("inf")
        print(
            f"{r['vocab']:>8} {r['dim']:>5} {r['snippet_s'] * 1e3:>11.2f} {r['fastadv_s'] * 1e3:>11.2f} "
            f"{r['snippet_s'] / r['fastadv_s']:>6.1f}x {r['snippet_mem'] / 2**20:>9.1f} "
            f"{r['fastadv_mem'] / 2**20:>9.1f} {mem_ratio:>6.1f}x"
        )
    if train:
        print(f"\ntraining step, 1-layer BERT + AdamW (batch {train[0]['batch']}x{TRAIN_SEQ}, median ms):")
        print(
            f"{'V':>8} {'hidden':>6} {'plain':>9} {'snippet':>9} {'fastadv':>9} "
            f"{'snip/fast':>9} {'snip-plain':>10} {'fast-plain':>10}"
        )
        for r in train:
            t = {k: v * 1e3 for k, v in r["times"].items()}
            print(
                f"{r['vocab']:>8} {r['dim']:>6} {t['plain']:>9.1f} {t['snippet']:>9.1f} {t['fastadv']:>9.1f} "
                f"{t['snippet'] / t['fastadv']:>8.2f}x {t['snippet'] - t['plain']:>10.1f} "
                f"{t['fastadv'] - t['plain']:>10.1f}"
            )
        print("(snip-plain, fast-plain: what the adversary adds to a plain step: one more forward/backward + attack)")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32000 128000 256000)")
    p.add_argument("--dim", type=int, help="embedding width for attack+restore (default 768 CPU, 4096 CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, help="timed calls per median (default 5 CPU, 20 CUDA)")
    p.add_argument("--train-hidden", type=int, help="BERT hidden size of the training step (default 256 CPU, 768 CUDA)")
    p.add_argument("--train-batch", type=int, default=TRAIN_BATCH, help=f"sequences per step (x{TRAIN_SEQ} tokens)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU), named in the device column")
    p.add_argument("--skip-train", action="store_true", help="measure attack+restore and memory only")
    p.add_argument("--quick", action="store_true", help="smoke run: V 8000 32000, 2 repeats, nothing saved")
    p.add_argument("--no-save", action="store_true", help="print only: no CSV rows, no plot")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    args.vocab = args.vocab or ([8000, 32000] if args.quick else [32000, 128000, 256000])
    args.dim = args.dim or (4096 if cuda else 768)
    args.repeats = args.repeats or (2 if args.quick else 20 if cuda else 5)
    args.train_hidden = args.train_hidden or (768 if cuda else 256)
    args.save = not (args.quick or args.no_save)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    desc = device_description(device)
    revision = fastadv_revision()
    log(f"device: {desc}; torch {env['torch']}, triton {env['triton']}, python {env['python']}; {revision}")
    log(
        f"vocab {args.vocab}, d={args.dim}, repeats {args.repeats}, train hidden {args.train_hidden}"
        f"{' (skipped)' if args.skip_train else ''}; FASTADV_BACKEND={os.environ.get('FASTADV_BACKEND', 'auto')}"
    )
    start = time.perf_counter()
    base = provenance(device)
    rows: list[dict] = []
    attack: list[dict] = []
    for vocab in args.vocab:
        r = bench_attack(vocab, args.dim, device, args.repeats)
        attack.append(r)
        for impl in ("snippet", "fastadv"):
            rows.append(
                base
                | {
                    "benchmark": "attack_restore",
                    "vocab": vocab,
                    "dim": args.dim,
                    "batch": f"{BATCH}x{SEQ}",
                    "impl": impl,
                    "median_s": f"{r[f'{impl}_s']:.6g}",
                    "repeats": args.repeats,
                    "extra_memory_bytes": r[f"{impl}_mem"],
                    "notes": f"{revision}; {r['notes']}",
                }
            )
    train: list[dict] = []
    if not args.skip_train:
        for vocab in args.vocab:
            r = bench_train(vocab, args.train_hidden, device, args.repeats, args.train_batch)
            r["batch"] = args.train_batch
            train.append(r)
            for impl in ("plain", "snippet", "fastadv"):
                rows.append(
                    base
                    | {
                        "benchmark": "train_step",
                        "vocab": vocab,
                        "dim": args.train_hidden,
                        "batch": f"{args.train_batch}x{TRAIN_SEQ}",
                        "impl": impl,
                        "median_s": f"{r['times'][impl]:.6g}",
                        "repeats": args.repeats,
                        "extra_memory_bytes": "",
                        "notes": f"{revision}; {r['notes']}",
                    }
                )
    print_tables(attack, train, desc)
    if args.save:
        append_rows(rows, CSV_PATH, SHAPE_LAYOUT)
        png = plot(attack, device, desc, args.dim)
        log(f"appended {len(rows)} rows to {CSV_PATH}; plot {png}")
    else:
        log("quick / --no-save run: nothing written")
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

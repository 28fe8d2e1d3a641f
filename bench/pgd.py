"""PGD, K = 3: the copied snippet's loop vs fastadv's pgd.step (and its drop-in calls), side by side in one run.

For a random BertForSequenceClassification, times the passes of one training step (median over
turns): plain (one clean forward/backward, the floor), the snippet's loop (backup_grad, K attacks
on the whole V x d table, K - 1 zero_grad + full backward, restore_grad, full backward, restore),
fastadv's drop-in (the same calls on fastadv.PGD) and pgd.step (the K - 1 inner passes compute
dL/de only). For each: the peak memory above the start (CUDA: the allocator's peak; CPU: replayed
from the profiler's allocation events), and the bytes copied out of parameter gradients. Checks
that the three PGD variants give the same gradient, prints the table and appends rows to
bench/results/pgd.csv.

    python bench/pgd.py                       # CPU: V 128000, hidden 256, 2 layers; CUDA: hidden 768, 4 layers
    python bench/pgd.py --vocab 32000 --repeats 9
    python bench/pgd.py --quick               # small smoke run, saves nothing
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import (
    RESULTS,
    append_rows,
    bert_classifier,
    fastadv_revision,
    interleaved_medians,
    load_average,
    load_note,
    log,
    parameter_gradients,
    result_rows,
)

from fastadv import PGD
from fastadv.benchmarking import GradientCopies, device_description, peak_memory_bytes
from fastadv.snippets import SnippetPGD

CSV_PATH = RESULTS / "pgd.csv"
K, EPSILON, ALPHA = 3, 1.0, 0.3
EMB_NAME = "word_embeddings"


def snippet_loop(model: torch.nn.Module, adversary, closure) -> None:
    """The loop every PGD script has (also run with fastadv.PGD: its drop-in calls)."""
    closure().backward()
    adversary.backup_grad()
    for t in range(K):
        adversary.attack(EPSILON, ALPHA, EMB_NAME, is_first_attack=(t == 0))
        if t != K - 1:
            model.zero_grad()
        else:
            adversary.restore_grad()
        closure().backward()
    adversary.restore(EMB_NAME)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--hidden", type=int, default=None, help="default 256 on CPU, 768 on CUDA")
    parser.add_argument("--layers", type=int, default=None, help="default 2 on CPU, 4 on CUDA")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing saved")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hidden, layers = args.hidden or (768 if cuda else 256), args.layers or (4 if cuda else 2)
    if args.quick:
        args.vocab, hidden, layers, args.batch, args.seq, args.repeats = 5000, 64, 1, 4, 32, 2

    log(f"BERT {layers} layers, hidden {hidden}, vocab {args.vocab}, batch {args.batch}x{args.seq}, K={K}, {device}")
    base = bert_classifier(args.vocab, hidden, layers, args.seq, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    models = {name: copy.deepcopy(base) for name in ("plain", "snippet", "fastadv_drop_in", "fastadv_step")}
    del base
    adversaries = {
        "snippet": SnippetPGD(models["snippet"]),
        "fastadv_drop_in": PGD(models["fastadv_drop_in"], EPSILON, ALPHA, K, emb_name=EMB_NAME),
        "fastadv_step": PGD(models["fastadv_step"], EPSILON, ALPHA, K, emb_name=EMB_NAME),
    }

    def step(name: str):
        model = models[name]

        def closure() -> torch.Tensor:
            return model(input_ids=ids, labels=labels).loss

        def run() -> None:
            model.zero_grad(set_to_none=True)
            if name == "plain":
                closure().backward()
            elif name == "fastadv_step":
                adversaries[name].step(closure)
            else:
                snippet_loop(model, adversaries[name], closure)

        return run

    steps = {name: step(name) for name in models}
    for run in steps.values():
        run()
    reference = parameter_gradients(models["snippet"])

    def difference(name: str) -> float:
        return ((parameter_gradients(models[name]) - reference).norm() / reference.norm()).item()

    fastadv_impls = ("fastadv_drop_in", "fastadv_step")
    agreement = "; ".join(f"{n} vs snippet: grad rel diff {difference(n):.1e}" for n in fastadv_impls)
    log(agreement)

    before = load_average()
    times = interleaved_medians(steps, device, args.repeats)
    note = f"{fastadv_revision()}; K={K}, eps={EPSILON}, alpha={ALPHA}; {agreement}; {load_note(before)}"
    peaks, copied = {}, {}
    for name, run in steps.items():
        peaks[name] = peak_memory_bytes(run, device)
        with GradientCopies(models[name]) as copies:
            run()
        copied[name] = copies.bytes

    desc = device_description(device)
    shape = f"BERT {layers}x{hidden}, V={args.vocab}, batch {args.batch}x{args.seq}"
    print(f"\nPGD K={K} training step on {desc} ({shape}):")
    print(f"{'':>18}{'median ms':>12}{'peak MiB':>12}{'grad copies MiB':>18}")
    for name in steps:
        print(f"{name:>18}{1000 * times[name]:12.1f}{peaks[name] / 2**20:12.1f}{copied[name] / 2**20:18.1f}")
    print(
        f"pgd.step / snippet loop: time {times['fastadv_step'] / times['snippet']:.2f}x, "
        f"peak memory {peaks['fastadv_step'] / peaks['snippet']:.2f}x"
    )

    if args.quick:
        log("quick run: nothing written")
        return
    shape = {"vocab": args.vocab, "dim": hidden, "batch": f"{args.batch}x{args.seq}"}
    notes = {n: f"{layers} layers; memory = peak above start; gradient bytes copied {copied[n]}; {note}" for n in steps}
    rows = result_rows(device, "pgd_step", shape, times, args.repeats, peaks, notes)
    append_rows(rows, CSV_PATH)
    log(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    main()

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

import copy
from collections.abc import Callable

import torch
from common import (
    RESULTS,
    SHAPE_LAYOUT,
    append_rows,
    bert_classifier,
    bert_step_parser,
    fastadv_revision,
    interleaved_medians,
    load_average,
    load_note,
    log,
    relative_grad_difference,
    result_rows,
)
from measure import GradientCopies, device_description, peak_memory_bytes

from fastadv import PGD
from fastadv.snippets import SnippetPGD, pgd_snippet_step

CSV_PATH = RESULTS / "pgd.csv"
K, EPSILON, ALPHA = 3, 1.0, 0.3
EMB_NAME = "word_embeddings"


def snippet_loop(model: torch.nn.Module, adversary, closure, emb_name: str = EMB_NAME) -> None:
    """The loop every PGD script has (also run with fastadv.PGD: its drop-in calls), at this benchmark's K."""
    pgd_snippet_step(model, adversary, closure, K, epsilon=EPSILON, alpha=ALPHA, emb_name=emb_name)


def compare_pgd(
    base: torch.nn.Module,
    loss_of: Callable[[torch.nn.Module], torch.Tensor],
    emb_name: str,
    device: torch.device,
    repeats: int,
) -> dict:
    """One PGD (K = 3) training step's passes on copies of ``base``: plain, the snippet's loop, fastadv's
    drop-in and pgd.step, checked to give the same gradient, then timed in turns.

    Args:
        loss_of: runs a forward pass of the model it is given on the benchmark's batch; returns the loss.
        emb_name: the embedding's parameter name, as the snippet is called.

    Returns:
        times (median seconds), peaks (peak bytes above the start), copied (bytes copied out of ``.grad``),
        each by implementation name, and agreement (text: each fastadv variant's gradient vs the snippet's).
    """
    models = {name: copy.deepcopy(base) for name in ("plain", "snippet", "fastadv_drop_in", "fastadv_step")}
    adversaries = {
        "snippet": SnippetPGD(models["snippet"]),
        "fastadv_drop_in": PGD(models["fastadv_drop_in"], EPSILON, ALPHA, K, emb_name=emb_name),
        "fastadv_step": PGD(models["fastadv_step"], EPSILON, ALPHA, K, emb_name=emb_name),
    }

    def step(name: str):
        model = models[name]

        def closure() -> torch.Tensor:
            return loss_of(model)

        def run() -> None:
            model.zero_grad(set_to_none=True)
            if name == "plain":
                closure().backward()
            elif name == "fastadv_step":
                adversaries[name].step(closure)
            else:
                snippet_loop(model, adversaries[name], closure, emb_name)

        return run

    steps = {name: step(name) for name in models}
    for run in steps.values():
        run()
    agreement = "; ".join(
        f"{name} vs snippet: grad rel diff {relative_grad_difference(models[name], models['snippet']):.1e}"
        for name in ("fastadv_drop_in", "fastadv_step")
    )
    log(agreement)
    times = interleaved_medians(steps, device, repeats)
    peaks, copied = {}, {}
    for name, run in steps.items():
        peaks[name] = peak_memory_bytes(run, device)
        with GradientCopies(models[name]) as copies:
            run()
        copied[name] = copies.bytes
    return {"times": times, "peaks": peaks, "copied": copied, "agreement": agreement}


def main(argv: list[str] | None = None) -> None:
    parser = bert_step_parser(__doc__.split("\n\n")[0], 128000, None, "default 2 on CPU, 4 on CUDA")
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
    before = load_average()
    result = compare_pgd(base, lambda model: model(input_ids=ids, labels=labels).loss, EMB_NAME, device, args.repeats)
    del base
    times, peaks, copied = result["times"], result["peaks"], result["copied"]
    note = f"{fastadv_revision()}; K={K}, eps={EPSILON}, alpha={ALPHA}; {result['agreement']}; {load_note(before)}"

    desc = device_description(device)
    shape = f"BERT {layers}x{hidden}, V={args.vocab}, batch {args.batch}x{args.seq}"
    print(f"\nPGD K={K} training step on {desc} ({shape}):")
    print(f"{'':>18}{'median ms':>12}{'peak MiB':>12}{'grad copies MiB':>18}")
    for name in times:
        print(f"{name:>18}{1000 * times[name]:12.1f}{peaks[name] / 2**20:12.1f}{copied[name] / 2**20:18.1f}")
    print(
        f"pgd.step / snippet loop: time {times['fastadv_step'] / times['snippet']:.2f}x, "
        f"peak memory {peaks['fastadv_step'] / peaks['snippet']:.2f}x"
    )

    if args.quick:
        log("quick run: nothing written")
        return
    shape = {"vocab": args.vocab, "dim": hidden, "batch": f"{args.batch}x{args.seq}"}
    notes = {n: f"{layers} layers; memory = peak above start; gradient bytes copied {copied[n]}; {note}" for n in times}
    rows = result_rows(device, "pgd_step", shape, times, args.repeats, peaks, notes)
    append_rows(rows, CSV_PATH, SHAPE_LAYOUT)
    log(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    main()

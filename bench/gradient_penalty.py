"""The gradient-penalty step: finite difference vs exact (double backward), side by side in one run.

For a small random BERT classifier (eager attention, which has a double backward), times one
training step's passes, median over turns: plain (loss.backward(), the floor), GradientPenalty
mode="finite_difference" and mode="exact"; measures each step's extra memory (CUDA: peak above the
start; CPU: bytes allocated); checks that the two modes' parameter gradients agree (cosine);
prints the table and appends rows to bench/results/gradient_penalty.csv.

    python bench/gradient_penalty.py                 # CPU: hidden 256; CUDA: hidden 768
    python bench/gradient_penalty.py --layers 4 --repeats 9
    python bench/gradient_penalty.py --quick         # small smoke run, saves nothing
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
    parameter_gradients,
    result_rows,
)
from measure import device_description, extra_memory_bytes

from fastadv import GradientPenalty

CSV_PATH = RESULTS / "gradient_penalty.csv"
EPSILON = 0.01


def compare_gradient_penalty(
    base: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], device: torch.device, repeats: int
) -> dict:
    """One gradient-penalty training step's passes on copies of ``base`` (which needs a double backward,
    e.g. eager attention): plain, finite difference and exact, compared (cosine), then timed in turns.

    Args:
        loss_of: runs a forward pass of the model it is given on the benchmark's batch; returns the loss.

    Returns:
        times (median seconds) and memory (extra bytes of the step) by implementation name, and
        agreement (text: cosines of the whole gradient and of its penalty part, finite difference vs exact).
    """
    models = {name: copy.deepcopy(base) for name in ("plain", "finite_difference", "exact")}
    penalties = {name: GradientPenalty(models[name], EPSILON, mode=name) for name in ("finite_difference", "exact")}

    def step(name: str):
        model = models[name]

        def run() -> None:
            model.zero_grad(set_to_none=True)
            if name == "plain":
                loss_of(model).backward()
            else:
                penalties[name].step(lambda: loss_of(model))

        return run

    steps = {name: step(name) for name in models}
    for run in steps.values():
        run()
    fd, exact, plain = (parameter_gradients(models[n]) for n in ("finite_difference", "exact", "plain"))
    cos = torch.nn.functional.cosine_similarity
    agreement = (
        f"cosine(fd, exact)={cos(fd, exact, 0).item():.6f}; penalty part {cos(fd - plain, exact - plain, 0).item():.6f}"
    )
    del fd, exact, plain
    log(f"agreement of the parameter gradients: {agreement}")
    times = interleaved_medians(steps, device, repeats)
    memory = {name: extra_memory_bytes(run, device) for name, run in steps.items()}
    return {"times": times, "memory": memory, "agreement": agreement}


def main(argv: list[str] | None = None) -> None:
    parser = bert_step_parser(__doc__.split("\n\n")[0], 30522, 2, "encoder layers")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    hidden = args.hidden or (768 if device.type == "cuda" else 256)
    if args.quick:
        hidden, args.layers, args.batch, args.seq, args.repeats = 64, 1, 4, 32, 2

    log(f"BERT {args.layers} layers, hidden {hidden}, vocab {args.vocab}, batch {args.batch}x{args.seq}, {device}")
    base = bert_classifier(args.vocab, hidden, args.layers, args.seq, device, attention="eager")  # exact needs it
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    before = load_average()
    loss_of = lambda model: model(input_ids=ids, labels=labels).loss  # noqa: E731
    result = compare_gradient_penalty(base, loss_of, device, args.repeats)
    del base
    times, memory = result["times"], result["memory"]
    note = f"{fastadv_revision()}; eps={EPSILON}; eager attention; {result['agreement']}; {load_note(before)}"

    desc = device_description(device)
    print(f"\ngradient-penalty step on {desc} (BERT {args.layers}x{hidden}, batch {args.batch}x{args.seq}):")
    print(f"{'':>20}{'median ms':>12}{'extra MiB':>12}")
    for name in times:
        print(f"{name:>20}{1000 * times[name]:12.1f}{memory[name] / 2**20:12.1f}")
    ratio = times["finite_difference"] / times["exact"]
    print(f"finite_difference / exact: time {ratio:.2f}x, memory {memory['finite_difference'] / memory['exact']:.2f}x")

    if args.quick:
        log("quick run: nothing written")
        return
    shape = {"vocab": args.vocab, "dim": hidden, "batch": f"{args.batch}x{args.seq}"}
    rows = result_rows(
        device, "gradient_penalty_step", shape, times, args.repeats, memory, f"{args.layers} layers; {note}"
    )
    append_rows(rows, CSV_PATH, SHAPE_LAYOUT)
    log(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    main()

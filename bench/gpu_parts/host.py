"""The host part: bench/host_cost.py's comparison on the device, where a BERT-size step is launch-bound.

CUDA step time (host and device: each step synchronized), the ops each step dispatches, fastadv against the
code it replaces, at BERT-base's shape (V = 21,128, d = 768, 12 layers, bf16; batch 16 x 128 and 32 x 128:
plain, FGM and the snippet, pgd.step and the snippet's PGD loop, R3F and its inputs_embeds reference) and at
the cost part's Qwen2 shape (V = 151,936, d = 4096, 2 layers, bf16, batch 4 x 1024: plain, FGM, snippet).
"""

from __future__ import annotations

import torch
from host_cost import LAYOUT, ModelSpec, measure_model, print_table, result_rows

from gpu_parts.run import Run, dtype_name


def host_specs(run: Run) -> list[tuple[ModelSpec, list[str]]]:
    """The models and the methods run on each (plain first)."""
    device, dtype = str(run.device), run.sizes.dtype
    if run.quick:
        return [(ModelSpec("bert", 2, vocab=1000, hidden=64, device=device, dtype=dtype), ["plain", "fgm", "pgd"])]
    bert, qwen2 = ["plain", "fgm", "pgd", "r3f"], ["plain", "fgm"]
    return [
        (ModelSpec("bert", 12, vocab=21128, hidden=768, batch=16, seq=128, device=device, dtype=dtype), bert),
        (ModelSpec("bert", 12, vocab=21128, hidden=768, batch=32, seq=128, device=device, dtype=dtype), bert),
        (ModelSpec("qwen2", 2, vocab=151936, hidden=4096, batch=4, seq=1024, device=device, dtype=dtype), qwen2),
    ]


def part_host(run: Run) -> str:
    """host_cost.py's steps at real shapes on the device: ms and ops per step, fastadv vs its reference."""
    summary = []
    for spec, methods in host_specs(run):
        if run.over_budget(spec.label):
            break
        measured = measure_model(spec, methods, run.sizes.repeats, enforce_agreement=spec.dtype == torch.float32)
        print_table(measured, run.sizes.repeats)
        run.save("gpu_host_cost.csv", result_rows(measured, run.sizes.repeats, None), LAYOUT)
        ratios = [f"{m} {measured.ratio(measured.measured[f'{m} fastadv']):.2f}x" for m in methods if m != "plain"]
        summary.append(f"{spec.kind} {spec.batch}x{spec.seq} {dtype_name(spec.dtype)}: {', '.join(ratios)}")
    return "; ".join(summary) or "no configuration ran"

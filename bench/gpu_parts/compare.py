"""The pgd and gp parts: PGD K=3 and the gradient penalty (finite difference vs exact) on a smaller Llama."""

from __future__ import annotations

from collections.abc import Callable

import torch
from common import fastadv_revision, llama_lm, log, provenance
from gradient_penalty import EPSILON as GP_EPSILON
from gradient_penalty import compare_gradient_penalty
from pgd import K, compare_pgd
from torch import nn

from gpu_parts.run import Run, dtype_name
from gpu_parts.step import LLAMA_EMB_NAME, STEP_LAYOUT


def compare_setup(run: Run, attention: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], dict]:
    """The smaller Llama of the pgd and gp parts, its batch's loss, and the CSV columns of its rows."""
    vocab, hidden, layers, intermediate, batch, seq = run.sizes.compare
    log(f"Llama {layers} x {hidden} (intermediate {intermediate}), V={vocab}, batch {batch}x{seq}, {attention}")
    base = llama_lm(vocab, hidden, layers, intermediate, seq, run.device, run.sizes.dtype, attention)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(run.device)
    columns = {"model": f"LlamaForCausalLM, {attention} attention", "vocab": vocab, "hidden": hidden}
    columns |= {"layers": layers, "tokens": batch * seq, "dtype": dtype_name(run.sizes.dtype)}
    return base, lambda model: model(input_ids=ids, labels=ids).loss, columns


def save_comparison(
    run: Run, benchmark: str, columns: dict, times: dict[str, float], peaks: dict[str, int], note: str
) -> None:
    """Print a comparison's times (and x plain) and peaks; append its rows to gpu_step.csv."""
    base = provenance(run.device) | {"benchmark": benchmark, "status": "ok", "repeats": run.sizes.repeats} | columns
    rows = [
        base | {"impl": impl, "median_s": f"{seconds:.6g}", "vs_plain": f"{seconds / times['plain']:.4f}"}
        | {"peak_above_start_bytes": peaks[impl], "notes": f"{fastadv_revision()}; {note}"}
        for impl, seconds in times.items()
    ]  # fmt: skip
    print(f"{'':>18}{'median ms':>11}{'x plain':>9}{'peak above start MiB':>22}")
    for impl, seconds in times.items():
        print(f"{impl:>18}{seconds * 1e3:>11.1f}{seconds / times['plain']:>8.2f}x{peaks[impl] / 2**20:>22.1f}")
    run.save("gpu_step.csv", rows, STEP_LAYOUT)


def part_pgd(run: Run) -> str:
    """compare_pgd (pgd.py) on the smaller Llama."""
    base, loss_of, columns = compare_setup(run, "sdpa")
    result = compare_pgd(base, loss_of, LLAMA_EMB_NAME, run.device, run.sizes.repeats)
    t, peaks, agreement = result["times"], result["peaks"], result["agreement"]
    save_comparison(run, "gpu_pgd_step", columns, t, peaks, f"K={K}; grad bytes copied {result['copied']}; {agreement}")
    ratio = peaks["fastadv_step"] / max(peaks["snippet"], 1)
    return f"pgd.step {t['fastadv_step'] / t['snippet']:.2f}x the snippet's time, {ratio:.2f}x its peak; {agreement}"


def part_gp(run: Run) -> str:
    """compare_gradient_penalty (gradient_penalty.py) on the smaller Llama, eager attention."""
    base, loss_of, columns = compare_setup(run, "eager")  # exact mode needs a double backward
    result = compare_gradient_penalty(base, loss_of, run.device, run.sizes.repeats)
    t, memory, agreement = result["times"], result["memory"], result["agreement"]
    save_comparison(run, "gpu_gradient_penalty_step", columns, t, memory, f"epsilon {GP_EPSILON}; {agreement}")
    ratio = memory["finite_difference"] / max(memory["exact"], 1)
    time_ratio = t["finite_difference"] / t["exact"]
    return f"finite difference {time_ratio:.2f}x exact's time, {ratio:.2f}x its memory; {agreement}"

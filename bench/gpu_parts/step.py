"""The step and cost parts: whole training steps of a Llama (plain, snippet, fastadv) and bench/step_cost.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from common import Layout, fastadv_revision, interleaved_medians, llama_lm, log, provenance, release
from measure import peak_memory_bytes
from step_cost import LAYOUT as COST_LAYOUT
from step_cost import bench_shape

from fastadv import FGM
from fastadv.snippets import SnippetFGM
from gpu_parts.run import EPSILON, FULL, Run, dtype_name, gib

LLAMA_EMB_NAME = "embed_tokens"  # as the snippet is called on a Llama: model.embed_tokens.weight
FIT_FRACTION = 0.85  # a configuration runs when its estimated peak is under this fraction of the device


STEP_LAYOUT = Layout(
    config=("model", "vocab", "hidden", "layers", "tokens", "dtype"),
    metrics=(
        "status",
        "median_s",
        "repeats",
        "vs_plain",
        "peak_bytes",
        "peak_above_start_bytes",
        "estimated_peak_bytes",
    ),
)


def assert_restored(weight: torch.Tensor, before: torch.Tensor, what: str) -> None:
    """restore() put the [V, d] table back bit for bit."""
    assert torch.equal(weight, before), f"{what}: restore() did not put the weights back bit for bit"


def llama_step_estimate(vocab: int, tokens: int, hidden: int, layers: int, intermediate: int, dtype_bytes: int) -> dict:
    """The peak bytes of one FGM training step of llama_lm (AdamW, every tensor in the parameters' dtype), by part.

    - state: weights, gradients and AdamW's two moments, 4 x params x dtype (torch keeps the moments in the
      parameter's dtype; fused AdamW makes no model-sized temporaries);
    - logits: 12 x N x V. transformers upcasts the [N, V] logits to fp32 for the loss; the backward begins
      with the fp32 log-softmax (saved), its fp32 gradient and the fp32 gradient of the upcast logits live
      at once (the forward peaks lower: the dtype logits, their fp32 copy, the log-softmax: 10 x N x V in bf16);
    - activations: per token and layer about 10 hidden-wide and 4 intermediate-wide tensors are saved
      (norm inputs and outputs, q/k/v, attention output, gate, up, SiLU, their product), plus 4 x hidden;
    - snippet_backup: the snippet's clone of the table, alive through its adversarial pass (fastadv's
      saved rows are min(N, V) x hidden at most, included in the slack);
    - slack: 1 GiB for the allocator's rounding, cuBLAS workspaces and fastadv's rows.
    """
    heads = max(1, hidden // 128)
    kv_dim = max(1, heads // 4) * (hidden // heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate + 2 * hidden
    params = layers * per_layer + 2 * vocab * hidden + hidden
    parts = {
        "params": params,
        "state": 4 * params * dtype_bytes,
        "logits": 12 * tokens * vocab,
        "activations": tokens * dtype_bytes * (layers * (10 * hidden + 4 * intermediate) + 4 * hidden),
        "snippet_backup": vocab * hidden * dtype_bytes,
        "slack": 2**30,
    }
    parts["total"] = sum(v for k, v in parts.items() if k != "params")
    return parts


def describe_estimate(e: dict) -> str:
    """One line of llama_step_estimate's parts, in GiB."""
    return (
        f"{e['params'] / 1e9:.2f} B params -> state {gib(e['state']):.1f} GiB + logits {gib(e['logits']):.1f} "
        f"+ activations {gib(e['activations']):.1f} + snippet backup {gib(e['snippet_backup']):.1f} + slack 1 "
        f"= {gib(e['total']):.1f} GiB"
    )


def llama_step(run: Run, vocab: int, tokens: int) -> dict:
    """plain, snippet FGM and fastadv FGM steps of one model and optimizer, timed in turns, then their peaks."""
    s = run.sizes
    hidden, layers, intermediate, seq = s.llama
    model = llama_lm(vocab, hidden, layers, intermediate, seq, run.device, s.dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (tokens // seq, seq), generator=gen).to(run.device)
    # One model for the three (three copies would not fit): fastadv's hooks, attached before the first
    # forward as they must be, cost the other two one tensor hook and a list append per step.
    fgm, snippet = FGM(model, EPSILON), SnippetFGM(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=run.device.type == "cuda")

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    # Agreement first, on the same weights and gradient: the adversarial losses of snippet and fastadv.
    optimizer.zero_grad(set_to_none=True)
    clean = loss()
    clean.backward()
    table = model.get_input_embeddings().weight
    before = table.detach().clone()
    adversarial = {}
    for impl, attack, restore in (
        ("snippet", lambda: snippet.attack(EPSILON, LLAMA_EMB_NAME), lambda: snippet.restore(LLAMA_EMB_NAME)),
        ("fastadv", lambda: fgm.attack(EPSILON), fgm.restore),
    ):
        attack()
        with torch.no_grad():
            adversarial[impl] = loss().item()
        restore()
        assert_restored(table, before, f"{impl} on the Llama step")
    del before
    increase = {impl: value - clean.item() for impl, value in adversarial.items()}
    assert all(math.isfinite(v) for v in increase.values()), f"adversarial losses not finite: {adversarial}"
    agreement = f"adversarial loss - clean: snippet {increase['snippet']:.3g}, fastadv {increase['fastadv']:.3g}"
    log(f"  {agreement} (clean {clean.item():.4f})")
    del clean

    def step(impl: str) -> Callable[[], None]:
        def run_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            if impl == "snippet":
                snippet.attack(EPSILON, LLAMA_EMB_NAME)
                loss().backward()
                snippet.restore(LLAMA_EMB_NAME)
            elif impl == "fastadv":
                fgm.attack(EPSILON)
                loss().backward()
                fgm.restore()
            optimizer.step()

        return run_step

    steps = {impl: step(impl) for impl in ("plain", "snippet", "fastadv")}
    times = interleaved_medians(steps, run.device, s.repeats)
    resident = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None  # CPU: no counter
    peaks = {impl: peak_memory_bytes(fn, run.device) for impl, fn in steps.items()}
    return {"times": times, "peaks": peaks, "resident": resident, "agreement": agreement, "backend": fgm.backend}


def peak_bytes(result: dict, impl: str) -> int | None:
    """A step's absolute peak: what was allocated before it (weights, gradients, AdamW states) plus its
    peak above that. None on a CPU, which has no allocation counter."""
    return None if result["resident"] is None else result["resident"] + result["peaks"][impl]


def part_step(run: Run) -> str:
    """llama_step per configuration, smallest estimate first; those that cannot fit, or run out of
    memory, or start after the budget, are recorded with their reason and skipped."""
    s = run.sizes
    hidden, layers, intermediate, seq = s.llama
    dtype_bytes = torch.finfo(s.dtype).bits // 8
    total_memory = torch.cuda.get_device_properties(run.device).total_memory if run.device.type == "cuda" else None
    if run.quick:  # the plan of the full run, so the arithmetic is checked here too
        h, n_layers, inter, _ = FULL.llama
        print(f"plan of the GPU run: Llama {n_layers} x {h}, intermediate {inter}, bf16; runs under 85% of 139 GiB")
        for vocab, tokens in FULL.step_configs:
            estimate = llama_step_estimate(vocab, tokens, h, n_layers, inter, 2)
            fits = "runs" if gib(estimate["total"]) <= FIT_FRACTION * 139 else "skipped"
            print(f"  V={vocab} N={tokens}: {describe_estimate(estimate)}: {fits}")
    memory = f"{gib(total_memory):.1f} GiB" if total_memory is not None else "not checked on a CPU"
    log(
        f"Llama {layers} x {hidden} (intermediate {intermediate}), seq {seq}, {dtype_name(s.dtype)} weights and "
        f"AdamW states, epsilon {EPSILON}; device memory {memory}"
    )
    configs = sorted(
        s.step_configs, key=lambda c: llama_step_estimate(*c, hidden, layers, intermediate, dtype_bytes)["total"]
    )
    rows, results, skipped = [], [], []
    base = provenance(run.device) | {"benchmark": "gpu_llama_step", "model": "LlamaForCausalLM", "hidden": hidden}
    base |= {"layers": layers, "dtype": dtype_name(s.dtype), "repeats": s.repeats}
    for vocab, tokens in configs:
        estimate = llama_step_estimate(vocab, tokens, hidden, layers, intermediate, dtype_bytes)
        log(f"V={vocab} N={tokens}: {describe_estimate(estimate)}")
        config = base | {"vocab": vocab, "tokens": tokens, "estimated_peak_bytes": estimate["total"]}
        if total_memory is not None and estimate["total"] > FIT_FRACTION * total_memory:
            status = f"skipped: estimated peak {gib(estimate['total']):.0f} GiB > {FIT_FRACTION:.0%} of the device"
        elif run.over_budget(f"V={vocab} N={tokens}"):
            status = "skipped: part over its time budget"
        else:
            try:
                result = llama_step(run, vocab, tokens)
                status = "ok"
            except torch.OutOfMemoryError as err:
                status = f"oom: {str(err).splitlines()[0][:160]}"
        release(run.device)  # after the except block: the traceback no longer holds the step's tensors
        if status != "ok":
            log(f"  {status}")
            skipped.append(f"V={vocab} N={tokens} {status.split(':')[0]}")
            rows.append(config | {"impl": "all", "status": status, "notes": fastadv_revision()})
            continue
        times, peaks = result["times"], result["peaks"]
        results.append({"vocab": vocab, "tokens": tokens, **result})
        note = f"{fastadv_revision()}; fastadv backend {result['backend']}; {result['agreement']}"
        for impl in times:
            rows.append(
                config
                | {"impl": impl, "status": "ok", "median_s": f"{times[impl]:.6g}"}
                | {"vs_plain": f"{times[impl] / times['plain']:.4f}", "peak_bytes": peak_bytes(result, impl)}
                | {"peak_above_start_bytes": peaks[impl], "notes": note}
            )
    run.save("gpu_step.csv", rows, STEP_LAYOUT)
    run.plot_data["step"] = results
    print(f"\ntraining step (Llama {layers} x {hidden}, {dtype_name(s.dtype)}), median ms and x plain; peak GiB:")
    print(f"{'V':>8} {'tokens':>7} {'plain':>9} {'snippet':>16} {'fastadv':>16}   {'peak plain/snippet/fastadv':>27}")
    for r in results:
        t = r["times"]
        p = " ".join(f"{gib(b):>8.2f}" if (b := peak_bytes(r, impl)) is not None else "     n/a" for impl in t)
        print(
            f"{r['vocab']:>8} {r['tokens']:>7} {t['plain'] * 1e3:>9.1f} "
            f"{t['snippet'] * 1e3:>9.1f} ({t['snippet'] / t['plain']:.2f}x) {t['fastadv'] * 1e3:>9.1f} "
            f"({t['fastadv'] / t['plain']:.2f}x)   {p}"
        )
    parts = [
        f"V={r['vocab']} N={r['tokens']}: snippet {r['times']['snippet'] / r['times']['plain']:.2f}x, "
        f"fastadv {r['times']['fastadv'] / r['times']['plain']:.2f}x plain"
        for r in results[-2:]
    ]
    return "; ".join(parts + skipped) or "no configuration ran"


def part_cost(run: Run) -> str:
    """bench/step_cost.py on the device: plain, snippet, FGM, pgd.step, FreeLB, the penalty, rows vs dense."""
    shape = run.sizes.cost
    rows = bench_shape(shape, run.device, run.sizes.dtype, run.sizes.repeats, run.quick)
    run.save("gpu_step_cost.csv", rows, COST_LAYOUT)
    ratio = {(r["impl"], r["row_gradients"]): float(r["x_plain"]) for r in rows}
    return (
        f"{shape.name} {dtype_name(run.sizes.dtype)}: FGM {ratio[('fgm', 1)]:.2f}x plain with rows, "
        f"{ratio[('fgm', 0)]:.2f}x dense; snippet {ratio[('snippet', 1)]:.2f}x"
    )

"""VAT, SMART and R3F against straightforward ``inputs_embeds`` implementations, timed in turns in one run.

    python bench/consistency.py            # BERT at multilingual-e5-small's width (V = 250,002, d = 384), 4 layers
    python bench/consistency.py --quick    # tiny shapes, each step a few times, nothing saved (CI)

Every step is followed by fused AdamW's step (Trainer's ``adamw_torch_fused``) and ``zero_grad()``.

- plain: one forward and backward of the task loss.
- fastadv: ``VAT.step`` / ``SMART.step`` / ``R3F.step``: the inner passes take the gradient to the
  perturbation alone (``torch.autograd.grad``), the term joins the task loss in one backward.
- reference: the published algorithm on ``inputs_embeds`` as the widely copied VAT loss writes it
  (``lyakaap/VAT-pytorch``'s ``VATLoss``, the inputs being the word embedding's output): each inner pass
  a full ``backward()`` whose parameter gradients are thrown away (``model.zero_grad()``, so the term is
  computed before the task loss), with the clean logits from a no-grad forward of their own; then one
  backward of loss + term. R3F's reference is fairseq's form (two forwards, one backward of the sum): there is nothing
  to save, and the row shows fastadv at that floor.

Per row: the median time of a step, the ratio to plain's median (same run), the peak memory above the
start of the step (CPU: replayed from the profiler's allocation events), and the passes that compute
parameter gradients. The two implementations are checked to give the same gradients first (1e-4).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SHAPE_LAYOUT,
    append_rows,
    bert_classifier,
    interleaved_medians,
    load_average,
    load_note,
    log,
    provenance,
    relative_grad_difference,
)
from measure import peak_memory_bytes

from fastadv import R3F, SMART, VAT

RESULTS = Path(__file__).resolve().parent / "results" / "consistency.csv"

EPS, XI = 1.0, 0.3  # VAT
SMART_ARGS = dict(epsilon=0.05, step_size=0.02, noise_var=0.01)
R3F_EPS = 0.1


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), reduction="batchmean", log_target=True)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]


def reference_vat(model, batch) -> None:
    """VATLoss's form on inputs_embeds: a no-grad clean forward, an inner backward() with parameter gradients,
    zero_grad, then the task loss's forward and one backward of loss + term."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        clean_logits = model(**batch).logits
    e = emb(batch["input_ids"]).detach()
    d = XI * unit(torch.randn_like(e))
    d.requires_grad_()
    adv_distance = kl(clean_logits, model(inputs_embeds=e + d, attention_mask=batch["attention_mask"]).logits)
    adv_distance.backward()  # every parameter's gradient too, thrown away below
    r_adv = EPS * unit(d.grad)
    model.zero_grad()
    out = model(**batch)
    e = emb(batch["input_ids"])
    lds = kl(out.logits.detach(), model(inputs_embeds=e + r_adv, attention_mask=batch["attention_mask"]).logits)
    (out.loss + lds).backward()


def reference_smart(model, batch) -> None:
    emb = model.get_input_embeddings()
    with torch.no_grad():
        clean_logits = model(**batch).logits
    e = emb(batch["input_ids"]).detach()
    noise = (torch.randn_like(e) * SMART_ARGS["noise_var"]).requires_grad_()
    adv = kl(clean_logits, model(inputs_embeds=e + noise, attention_mask=batch["attention_mask"]).logits)
    adv.backward()
    g = noise.grad
    noise = (noise.detach() + SMART_ARGS["step_size"] * g / g.abs().amax(-1, keepdim=True).clamp(min=1e-12)).clamp(
        -SMART_ARGS["epsilon"], SMART_ARGS["epsilon"]
    )
    model.zero_grad()
    out = model(**batch)
    e = emb(batch["input_ids"])
    adv_logits = model(inputs_embeds=e + noise, attention_mask=batch["attention_mask"]).logits
    (out.loss + kl(out.logits.detach(), adv_logits) + kl(adv_logits.detach(), out.logits)).backward()


def reference_r3f(model, batch) -> None:
    emb = model.get_input_embeddings()
    out = model(**batch)
    e = emb(batch["input_ids"])
    noise = torch.empty_like(e).uniform_(-R3F_EPS, R3F_EPS)
    noisy = model(inputs_embeds=e + noise, attention_mask=batch["attention_mask"]).logits
    (out.loss + kl(out.logits, noisy) + kl(noisy, out.logits)).backward()


def timed_step(key: str, model, adversary, reference, batch) -> callable:
    """One training step of ``key``'s implementation, with fused AdamW's step and zero_grad."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def run() -> None:
        if key == "fastadv":
            adversary.step(lambda: model(**batch), attention_mask=batch["attention_mask"])
        elif key == "reference":
            reference(model, batch)
        else:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return run


METHODS = {
    # name: (fastadv maker, reference step, parameter-gradient passes: fastadv, reference)
    "vat": (lambda m: VAT(m, epsilon=EPS, xi=XI), reference_vat, (1, 2)),
    "smart": (lambda m: SMART(m, **SMART_ARGS), reference_smart, (1, 2)),
    "r3f": (lambda m: R3F(m, epsilon=R3F_EPS), reference_r3f, (1, 1)),
}
LAYOUT = SHAPE_LAYOUT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, nothing saved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="in this order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    vocab, hidden, layers, bsz, seq = (1000, 64, 2, 4, 16) if args.quick else (250_002, 384, 4, 16, 64)
    repeats = 2 if args.quick else args.repeats
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (bsz, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (bsz,))}
    rows, failed = [], False
    # The first configuration timed in a process runs slower (the allocator grows to the V x d gradients and
    # the optimizer states): a first round of the first method is timed and thrown away.
    for round_index, name in enumerate(args.methods[:1] * (not args.quick) + args.methods):
        make, reference, passes = METHODS[name]
        warmup = round_index == 0 and not args.quick
        ours_model = bert_classifier(vocab, hidden, layers, seq, device)
        ref_model, plain_model = copy.deepcopy(ours_model), copy.deepcopy(ours_model)
        adversary = make(ours_model)
        # Same gradients first (same random draws: seeded alike; the references draw as the methods do).
        torch.manual_seed(1)
        adversary.step(lambda model=ours_model: model(**batch), attention_mask=batch["attention_mask"])
        torch.manual_seed(1)
        reference(ref_model, batch)
        difference = relative_grad_difference(ours_model, ref_model)
        log(f"{name}: gradients of fastadv and the reference differ by {difference:.2g} (relative)")
        failed |= not difference <= 1e-4
        ours_model.zero_grad()
        ref_model.zero_grad()
        models = {"fastadv": ours_model, "reference": ref_model, "plain": plain_model}
        fns = {key: timed_step(key, models[key], adversary, reference, batch) for key in models}
        before = load_average()
        medians = interleaved_medians(fns, device, repeats)
        peaks = {key: peak_memory_bytes(fn, device) for key, fn in fns.items()}
        if warmup:
            log(f"{name}: warm-up round, thrown away")
            continue
        for key in fns:
            grad_passes = {"plain": 1, "fastadv": passes[0], "reference": passes[1]}[key]
            log(
                f"{name:6s} {key:9s} {medians[key] * 1e3:9.1f} ms  x{medians[key] / medians['plain']:.2f} of plain  "
                f"peak {peaks[key] / 2**20:8.1f} MiB  parameter-gradient passes {grad_passes}"
            )
            rows.append(
                provenance(device)
                | {
                    "benchmark": f"consistency_{name}",
                    "impl": key,
                    "vocab": vocab,
                    "dim": hidden,
                    "batch": f"{bsz}x{seq}",
                    "median_s": medians[key],
                    "repeats": repeats,
                    "extra_memory_bytes": peaks[key],
                    "notes": f"BERT {layers} layers, fused AdamW, {args.threads} threads; {grad_passes} "
                    f"parameter-gradient passes; x{medians[key] / medians['plain']:.2f} of plain; {load_note(before)}",
                }
            )
    if args.quick:
        log("quick run: nothing written")
    else:
        append_rows(rows, RESULTS, LAYOUT)
        log(f"rows appended to {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

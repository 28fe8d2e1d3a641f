"""FGM in an accelerate training loop: no glue, ``fgm.step(closure, backward=accelerator.backward)``.

A small BERT classifier (random weights, built from a config: nothing is downloaded) learns a
synthetic task with gradient accumulation. ``accelerator.backward`` scales both of FGM's passes
(accumulation, fp16's GradScaler), and ``accelerator.accumulate`` steps the optimizer every 2
micro-batches. The same script runs under ``accelerate launch`` on several GPUs.

Run it (a few seconds on a CPU):

    python examples/accelerate_loop.py
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from common import synthetic_batches, tiny_bert_classifier

from fastadv import FGM

BATCH, STEPS = 8, 60


def main() -> None:
    model = tiny_bert_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    loader = torch.utils.data.DataLoader(synthetic_batches(2 * STEPS, BATCH), batch_size=None)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # After prepare(): with several processes the model is DDP-wrapped, and FGM then perturbs the rows
    # of every rank's batch (an FGM built earlier can be told with fgm.bind_data_parallel(model)).
    fgm = FGM(model, epsilon=0.3)

    model.train()
    losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = fgm.step(lambda batch=batch: model(**batch).loss, backward=accelerator.backward)
            optimizer.step()  # accelerate applies it (and zero_grad) every 2 micro-batches
            optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"accelerate + FGM: {len(losses)} micro-batches of {BATCH}, {len(losses) // 2} optimizer steps")
    print(f"mean loss over the first 20 micro-batches {first:.3f}, over the last 20 {last:.3f}")


if __name__ == "__main__":
    main()

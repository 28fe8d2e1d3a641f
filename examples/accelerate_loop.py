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
from transformers import BertConfig, BertForSequenceClassification

from fastadv import FGM

VOCAB, SEQ, BATCH, STEPS = 1000, 16, 8, 60


def synthetic_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token ids, label 0 from the lower half of the vocabulary, label 1 from the upper half."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 2, (BATCH,), generator=gen)
        ids = torch.randint(1, VOCAB // 2, (BATCH, SEQ), generator=gen) + labels[:, None] * (VOCAB // 2)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    fgm = FGM(model, epsilon=0.3)  # before prepare(), on the model itself (prepare may wrap it in DDP)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    loader = torch.utils.data.DataLoader(synthetic_batches(2 * STEPS), batch_size=None)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

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

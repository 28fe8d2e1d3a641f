"""FGM in a Lightning module, with manual optimization and ``adversarial_training_step``.

A small BERT classifier (random weights, built from a config: nothing is downloaded) learns a
synthetic task. The adversary runs two backward passes per step, so the module sets
``automatic_optimization = False``; the helper zeroes the gradients, runs FGM's passes through
``self.manual_backward`` and steps the optimizer.

Run it (a few seconds on a CPU):

    python examples/lightning_module.py
"""

from __future__ import annotations

import logging
import warnings

import lightning
import torch
from transformers import BertConfig, BertForSequenceClassification

from fastadv import FGM
from fastadv.integrations.lightning import adversarial_training_step

VOCAB, SEQ, BATCH, STEPS = 1000, 16, 16, 120


class AdversarialClassifier(lightning.LightningModule):
    def __init__(self, model: torch.nn.Module, epsilon: float = 0.3, lr: float = 1e-3) -> None:
        super().__init__()
        self.automatic_optimization = False  # adversarial_training_step needs it
        self.model = model
        self.fgm = FGM(model, epsilon=epsilon)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = adversarial_training_step(self, self.fgm, lambda: self.model(**batch).loss)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


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
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to the two lines below
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
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
    module = AdversarialClassifier(BertForSequenceClassification(config))
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(synthetic_batches(STEPS), batch_size=None))
    first, last = sum(module.losses[:10]) / 10, sum(module.losses[-10:]) / 10
    print(f"Lightning + FGM: {trainer.global_step} optimizer steps on batches of {BATCH}")
    print(f"mean loss over the first 10 steps {first:.3f}, over the last 10 {last:.3f}")


if __name__ == "__main__":
    main()

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
from common import synthetic_batches, tiny_bert_classifier

from fastadv import FGM
from fastadv.integrations.lightning import adversarial_training_step

BATCH, STEPS = 16, 120


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


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to the two lines below
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
    module = AdversarialClassifier(tiny_bert_classifier())
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(synthetic_batches(STEPS, BATCH), batch_size=None))
    first, last = sum(module.losses[:10]) / 10, sum(module.losses[-10:]) / 10
    print(f"Lightning + FGM: {trainer.global_step} optimizer steps on batches of {BATCH}")
    print(f"mean loss over the first 10 steps {first:.3f}, over the last 10 {last:.3f}")


if __name__ == "__main__":
    main()

"""FGM inside Hugging Face's Trainer: ``AdversarialTrainer(adversary=FGM(model), ...)``.

A small BERT classifier (random weights, built from a config: nothing is downloaded) learns a
synthetic task, with gradient accumulation; every micro-batch runs FGM's clean and adversarial
passes through ``Trainer``'s own loss, scaling and ``accelerator.backward``. Nothing is saved.

Run it (a few seconds on a CPU):

    python examples/hf_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from common import synthetic_batches, tiny_bert_classifier
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fastadv import FGM
from fastadv.integrations.hf import AdversarialTrainer


class TokenDataset(torch.utils.data.Dataset):
    """The examples' synthetic task (see common.py), one example per item."""

    def __init__(self, size: int, seed: int = 0) -> None:
        (self.batch,) = synthetic_batches(1, size, seed)

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.batch.items()}


def main() -> None:
    model = tiny_bert_classifier()
    fgm = FGM(model, epsilon=0.3)  # on the object passed as model=, before training
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_steps=60,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = AdversarialTrainer(adversary=fgm, model=model, args=args, train_dataset=TokenDataset(640))
        trainer.remove_callback(PrinterCallback)  # the two lines below say what happened
        result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(
        f"AdversarialTrainer + FGM: {result.global_step} optimizer steps, each over 2 micro-batches of 8 "
        "(clean + adversarial pass each)"
    )
    # Trainer sums the micro-batches' mean losses for models whose forward takes **kwargs (as BERT's does).
    print(f"loss per 10 steps, as Trainer logs it: {' -> '.join(f'{loss:.3f}' for loss in losses)}")


if __name__ == "__main__":
    main()

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
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fastadv import FGM
from fastadv.integrations.hf import AdversarialTrainer

VOCAB, SEQ = 1000, 16


class TokenDataset(torch.utils.data.Dataset):
    """Random token ids, label 0 from the lower half of the vocabulary, label 1 from the upper half."""

    def __init__(self, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (size,), generator=gen)
        self.ids = torch.randint(1, VOCAB // 2, (size, SEQ), generator=gen) + self.labels[:, None] * (VOCAB // 2)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(SEQ, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


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

"""What the examples share: a small BERT classifier built from a config, and a synthetic task.

Nothing is downloaded: the weights are random, and the task (label 0: ids from the lower half of
the vocabulary, label 1: from the upper half) is learnable in a few dozen steps on a CPU.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB, SEQ = 1000, 16


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    """BertForSequenceClassification: 2 layers, hidden 64, VOCAB tokens, sequences of SEQ, 2 labels."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=SEQ, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def synthetic_batches(count: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch`` x SEQ token ids, with attention masks and labels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 2, (batch,), generator=gen)
        ids = torch.randint(1, VOCAB // 2, (batch, SEQ), generator=gen) + labels[:, None] * (VOCAB // 2)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches

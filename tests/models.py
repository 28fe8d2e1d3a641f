"""Small models built from configs with random weights (nothing is downloaded), and training loops."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

VOCAB = 211


def tiny_bert(
    vocab: int = VOCAB, hidden: int = 60, dtype: torch.dtype = torch.float32, seed: int = 0, attention: str = "sdpa"
) -> nn.Module:
    """BertForSequenceClassification, 2 layers, odd hidden size, no dropout (so runs can be compared).

    attention="eager" has a double backward; transformers' default "sdpa" has none on CPU.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    config._attn_implementation = attention
    return BertForSequenceClassification(config).to(DEVICE, dtype)


def tiny_gpt2(vocab: int = VOCAB, tied: bool = True, seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel whose input embedding is tied to the LM head (as in many small LLMs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=48, n_layer=1, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).to(DEVICE)


class BagOfEmbeddings(nn.Module):
    """A hand-written classifier: `self.emb`, the name the snippet's default emb_name='emb.' expects."""

    def __init__(self, vocab: int = VOCAB, dim: int = 123, padding_idx: int | None = None, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx, sparse=sparse)
        self.head = nn.Linear(dim, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(input_ids)).mean(dim=1))


class SmallLM(nn.Module):
    """An embedding (row 0 the padding row), two GELU layers and a per-token classifier: every op of its
    forward and backward can be captured in a CUDA graph.

    forward(ids [B, T] int64, labels [B, T] int64) returns the mean cross-entropy loss (a scalar).
    """

    CLASSES = 8

    def __init__(self, vocab: int = VOCAB, dim: int = 60, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, self.CLASSES)
        self.to(DEVICE)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.body(self.emb(ids))).flatten(0, 1), labels.flatten())


def token_batch(
    seed: int, low: int = 1, high: int = VOCAB, batch: int = 4, seq: int = 13
) -> tuple[torch.Tensor, torch.Tensor]:
    """SmallLM's (ids [B, T], labels [B, T]): ids in [low, high), the last two positions of each row padding (0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (batch, seq), generator=gen)
    ids[:, -2:] = 0
    labels = torch.randint(0, SmallLM.CLASSES, (batch, seq), generator=gen)
    return ids.to(DEVICE), labels.to(DEVICE)


def batches(n: int, vocab: int = VOCAB, batch: int = 4, seq: int = 13, seed: int = 1, repeats: bool = True):
    """Token id batches with labels; with repeats, every batch reuses ids heavily."""
    gen = torch.Generator().manual_seed(seed)
    high = min(vocab, 40) if repeats else vocab
    out = []
    for _ in range(n):
        ids = torch.randint(1, high, (batch, seq), generator=gen)
        ids[:, -2:] = 0  # padding at the end of every row
        out.append((ids.to(DEVICE), torch.randint(0, 3, (batch,), generator=gen).to(DEVICE)))
    return out


def bert_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=labels).loss


def bag_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(ids), labels)


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_with(
    model: nn.Module,
    adversary_factory: Callable[[nn.Module], object],
    data: list,
    loss_fn: LossFn,
    attack_args: tuple = (),
    restore_args: tuple = (),
    accumulate: int = 1,
    optimizer: str = "adamw",
    lr: float = 1e-3,
) -> nn.Module:
    """The loop every FGM script has: clean backward, attack, adversarial backward, restore, step."""
    adversary = adversary_factory(model)
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=lr)
    for i, (ids, labels) in enumerate(data):
        loss_fn(model, ids, labels).div(accumulate).backward()
        adversary.attack(*attack_args)
        loss_fn(model, ids, labels).div(accumulate).backward()
        adversary.restore(*restore_args)
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return model


def twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model, copy.deepcopy(model)

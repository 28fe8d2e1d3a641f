"""The slow FGM snippet that fastadv replaces, kept as the oracle for tests, benchmarks and the demo.

This is the code copied across fine-tuning scripts, with its behaviour reproduced exactly (the
whole-table clone, the whole-gradient norm, the host sync in ``if norm != 0``, the two V x d
temporaries, and the restore by rebinding ``param.data``). Do not use it for training: use
:class:`fastadv.FGM`, which takes the same calls.
"""

from __future__ import annotations

import torch


class SnippetFGM:
    """The copied FGM: ``attack(epsilon=1., emb_name='emb.')`` / ``restore(emb_name='emb.')``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}

    def attack(self, epsilon: float = 1.0, emb_name: str = "emb.") -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    r_at = epsilon * param.grad / norm
                    param.data.add_(r_at)

    def restore(self, emb_name: str = "emb.") -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                assert name in self.backup
                param.data = self.backup[name]
        self.backup = {}

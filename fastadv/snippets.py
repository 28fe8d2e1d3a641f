"""The slow FGM and PGD snippets that fastadv replaces, and the PGD loop they are called in: the reference
fastadv promises to match, kept public for tests, benchmarks and the demo.

This is the code copied across fine-tuning scripts, with its behaviour reproduced exactly (the
whole-table clone, the whole-gradient norm, the host sync in ``if norm != 0``, the V x d
temporaries, the restore by rebinding ``param.data``, and PGD's copy of every parameter's
gradient). Do not use it for training: use :class:`fastadv.FGM` and :class:`fastadv.PGD`, which
take the same calls.
"""

from __future__ import annotations

from collections.abc import Callable

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


class SnippetPGD:
    """The copied PGD: ``attack(epsilon=1., alpha=0.3, emb_name='emb.', is_first_attack=False)``,
    ``restore(emb_name='emb.')``, ``backup_grad()``, ``restore_grad()``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.emb_backup: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}

    def attack(self, epsilon: float = 1.0, alpha: float = 0.3, emb_name: str = "emb.", is_first_attack: bool = False):
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    r_at = alpha * param.grad / norm
                    param.data.add_(r_at)
                    param.data = self.project(name, param.data, epsilon)

    def restore(self, emb_name: str = "emb.") -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                assert name in self.emb_backup
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def project(self, param_name: str, param_data: torch.Tensor, epsilon: float) -> torch.Tensor:
        r = param_data - self.emb_backup[param_name]
        if torch.norm(r) > epsilon:
            r = epsilon * r / torch.norm(r)
        return self.emb_backup[param_name] + r

    def backup_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.grad = self.grad_backup[name]


def pgd_snippet_step(
    model: torch.nn.Module,
    adversary,
    closure: Callable[[], torch.Tensor],
    steps: int = 3,
    set_to_none: bool = True,
    after_attack: Callable[[int], object] | None = None,
    **names: object,
) -> None:
    """One training step's passes of the loop every PGD script has, around the snippet's calls (SnippetPGD's
    or fastadv.PGD's drop-in ones): clean backward, ``backup_grad()``, ``steps`` attacks with ``zero_grad()``
    between them and ``restore_grad()`` before the last backward, ``restore()``. No optimizer step.

    Args:
        closure: a forward pass; returns the loss.
        after_attack: called with t after the t-th attack (0-based).
        names: ``epsilon``, ``alpha``, ``emb_name`` for ``attack()``; ``emb_name`` goes to ``restore()`` too.
    """
    closure().backward()
    adversary.backup_grad()
    for t in range(steps):
        adversary.attack(is_first_attack=t == 0, **names)
        if after_attack is not None:
            after_attack(t)
        if t != steps - 1:
            model.zero_grad(set_to_none=set_to_none)
        else:
            adversary.restore_grad()
        closure().backward()
    adversary.restore(**{key: value for key, value in names.items() if key == "emb_name"})

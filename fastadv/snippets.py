"""The slow FGM and PGD snippets that fastadv replaces, the PGD loop they are called in, and the published FreeLB
loop: the reference fastadv promises to match, kept public for tests, benchmarks and the demo.

This is the code copied across fine-tuning scripts, with its behaviour reproduced exactly (the
whole-table clone, the whole-gradient norm, the host sync in ``if norm != 0``, the V x d
temporaries, the restore by rebinding ``param.data``, and PGD's copy of every parameter's
gradient). Do not use it for training: use :class:`fastadv.FGM`, :class:`fastadv.PGD` and
:class:`fastadv.FreeLB`.
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


def freelb_snippet_step(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    adv_lr: float = 0.1,
    adv_steps: int = 3,
    adv_init_mag: float = 0.0,
    adv_max_norm: float = 0.0,
    norm: str = "l2",
    keep_clean_loss: bool = False,
) -> torch.Tensor:
    """The published FreeLB step (the authors' huggingface script), through inputs_embeds: the loop fastadv.FreeLB
    replaces, kept as the reference its tests and benchmarks compare with. ``ids``, ``mask``, ``labels``: the
    batch (B x T, B x T, B). No optimizer step. Returns the summed loss, detached."""
    total = 0
    if keep_clean_loss:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        total = loss.detach()
    embeds_init = model.get_input_embeddings()(ids)
    if adv_init_mag > 0:
        input_mask = mask.to(embeds_init)
        input_lengths = torch.sum(input_mask, 1)
        if norm == "l2":
            delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * input_mask.unsqueeze(2)
            dims = input_lengths * embeds_init.size(-1)
            mag = adv_init_mag / torch.sqrt(dims)
            delta = (delta * mag.view(-1, 1, 1)).detach()
        else:
            delta = torch.zeros_like(embeds_init).uniform_(-adv_init_mag, adv_init_mag) * input_mask.unsqueeze(2)
    else:
        delta = torch.zeros_like(embeds_init)
    for astep in range(adv_steps):
        delta.requires_grad_()
        inputs_embeds = embeds_init + delta
        loss = model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels).loss
        loss = loss / adv_steps
        total = total + loss.detach()
        loss.backward()
        if astep == adv_steps - 1:
            break
        delta_grad = delta.grad.clone().detach()
        if norm == "l2":
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + adv_lr * delta_grad / denorm).detach()
            if adv_max_norm > 0:
                delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).detach()
                exceed_mask = (delta_norm > adv_max_norm).to(embeds_init)
                reweights = (adv_max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1)
                delta = (delta * reweights).detach()
        else:
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1, p=float("inf")).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + adv_lr * delta_grad / denorm).detach()
            if adv_max_norm > 0:
                delta = torch.clamp(delta, -adv_max_norm, adv_max_norm).detach()
        embeds_init = model.get_input_embeddings()(ids)
    return total

"""Which modules look an embedding table up, and how each one's output relates to the raw lookup.

A perturbation belongs to the table's rows (``weight[ids]``): weight mode adds it to those rows, so
every lookup of the table sees it, through whatever the looking-up module does next. Output mode
and the methods that act on embedding outputs (the gradient penalty, FreeLB, PGD's intermediate
passes) must do the same from a forward hook, which sees the module's output instead. This module
says, for each table, which modules look it up (T5/BART: one table, an encoder and a decoder
module), and for each module the factor between its output and the raw lookup (1 for
nn.Embedding; ``embed_scale`` for the Gemma and BART-family ``*ScaledWordEmbedding``), checked
bit for bit at the module's first lookup. Then dL/d(raw lookup) = factor * dL/d(output), and a
delta on the raw lookup is ``factor * delta`` on the output.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .errors import EmbeddingNotFoundError

Scale = float | torch.Tensor


def active_copy(wrapper: nn.Module) -> nn.Module | None:
    """The module a PEFT ``ModulesToSaveWrapper`` runs in forward, or None for any other module.

    The wrapper keeps the frozen ``original_module`` beside a trained copy per adapter
    (``modules_to_save[adapter]``) and calls one of them; peft is recognised by these attributes,
    never imported.
    """
    copies, original = getattr(wrapper, "modules_to_save", None), getattr(wrapper, "original_module", None)
    if not isinstance(copies, nn.ModuleDict) or not isinstance(original, nn.Module):
        return None
    adapters = getattr(wrapper, "active_adapters", None) or []
    if getattr(wrapper, "disable_adapters", False) or not adapters or any(a not in copies for a in adapters):
        return original
    return copies[adapters[0]]


def _idle_copies(model: nn.Module) -> set[int]:
    """ids of the modules under PEFT wrappers that forward does not call (the copies not active)."""
    idle: set[int] = set()
    for module in model.modules():
        active = active_copy(module)
        if active is None:
            continue
        running = {id(m) for m in active.modules()}
        idle |= {id(m) for m in module.modules() if m is not module and id(m) not in running}
    return idle


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """(name, module) of every nn.Embedding forward can call: PEFT's idle copies (the frozen
    ``original_module`` of ``modules_to_save``) are left out."""
    idle = _idle_copies(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and id(m) not in idle]


def table_modules(model: nn.Module, weight: torch.Tensor) -> list[tuple[str, nn.Embedding]]:
    """The modules that look up ``weight`` (several when a table is shared, as T5's and BART's are)."""
    return [(n, m) for n, m in embedding_modules(model) if m.weight is weight]


# ---------------------------------------------------------------- the raw lookup inside a module


_checked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def lookup_scale(module: nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> Scale:
    """The factor s with ``output == s * weight[ids]`` for this module: 1 for nn.Embedding itself.

    A subclass that overrides forward is checked once, at its first lookup, against the raw lookup
    times its ``embed_scale`` (or 1), bit for bit (one host sync, outside attack and restore). Any
    other transformation of the lookup cannot be undone by a factor: that raises, naming weight mode.

    Returns the factor as the module applies it (a float, or a 0-dim tensor in the weight's dtype).
    """
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(module, "embed_scale", 1.0)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(module.weight.dtype)
    if module not in _checked:
        with torch.no_grad():
            raw = nn.Embedding.forward(module, ids)
            _checked[module] = isinstance(output, torch.Tensor) and torch.equal(raw * scale, output)
    if not _checked[module]:
        raise EmbeddingNotFoundError(
            f"{type(module).__name__} changes its lookup in forward in a way fastadv cannot see through (its output "
            "is not the looked-up rows times its embed_scale), so a perturbation added to its output would not be "
            "the one the rows get. Use target='weight' (a trainable table not tied to the output projection), or "
            "perturb a plain nn.Embedding."
        )
    return scale


def _is_one(scale: Scale) -> bool:
    return isinstance(scale, float) and scale == 1.0


def raw_gradient(grad: torch.Tensor, scale: Scale) -> torch.Tensor:
    """dL/d(raw lookup) from dL/d(output): ``scale * grad`` (the product autograd forms for ``raw * scale``)."""
    return grad if _is_one(scale) else grad * scale


def on_output(delta: torch.Tensor, scale: Scale) -> torch.Tensor:
    """A delta on the raw lookup as the module's output receives it: ``scale * delta``."""
    return delta if _is_one(scale) else delta * scale

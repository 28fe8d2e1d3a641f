"""How a module's output relates to the raw lookup of its table.
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

from ..errors import EmbeddingNotFoundError

Scale = float | torch.Tensor


_checked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def lookup_scale(module: nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> Scale:
    """The factor s with ``output == s * weight[ids]`` for this module: 1 for nn.Embedding itself.

    A subclass that overrides forward is checked once, at its first lookup, against the raw lookup
    times its ``embed_scale`` (or 1), bit for bit (one host sync, outside attack and restore). Any
    other transformation of the lookup cannot be undone by a factor: that raises, naming weight mode.

    Returns the factor as the module applies it (a float, or a 0-dim tensor in the weight's dtype).
    """
    scale = known_lookup_scale(module, ids, output)
    if scale is None:
        raise EmbeddingNotFoundError(
            f"{type(module).__name__} changes its lookup in forward in a way fastadv cannot see through (its output "
            "is not the looked-up rows times its embed_scale), so a perturbation added to its output would not be "
            "the one the rows get. Use target='weight' (a trainable table not tied to the output projection), or "
            "perturb a plain nn.Embedding."
        )
    return scale


def known_lookup_scale(module: nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> Scale | None:
    """:func:`lookup_scale`, or None for a module whose output is not its raw lookup times a factor."""
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(module, "embed_scale", 1.0)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(module.weight.dtype)
    if module not in _checked:
        with torch.no_grad():
            raw = nn.Embedding.forward(module, ids)
            _checked[module] = isinstance(output, torch.Tensor) and torch.equal(raw * scale, output)
    return scale if _checked[module] else None


def _is_one(scale: Scale) -> bool:
    return isinstance(scale, float) and scale == 1.0


def raw_gradient(grad: torch.Tensor, scale: Scale) -> torch.Tensor:
    """dL/d(raw lookup) from dL/d(output): ``scale * grad`` (the product autograd forms for ``raw * scale``)."""
    return grad if _is_one(scale) else grad * scale


def on_output(delta: torch.Tensor, scale: Scale) -> torch.Tensor:
    """A delta on the raw lookup as the module's output receives it: ``scale * delta``."""
    return delta if _is_one(scale) else delta * scale

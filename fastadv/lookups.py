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

import os
import weakref

import torch
from torch import nn

from .errors import EmbeddingNotFoundError
from .ops.lookup import has_dense_gradient, row_gradient_lookup

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


# ---------------------------------------------------------------- the table's gradient, on its rows


ROW_GRADIENTS_VARIABLE = "FASTADV_ROW_GRADIENTS"


def row_gradients_enabled() -> bool:
    """Whether lookups into a table with a dense ``.grad`` give their gradient as rows: on unless
    ``FASTADV_ROW_GRADIENTS=0`` (read at each lookup), which keeps torch's dense embedding backward."""
    value = os.environ.get(ROW_GRADIENTS_VARIABLE, "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(
            f"{ROW_GRADIENTS_VARIABLE}={value!r}: set it to 1 (the default) or 0 (torch's dense backward)."
        )
    return value != "0"


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def _on_lookup(module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor | None:
    """Forward hook: the module's output again, through :func:`fastadv.ops.row_gradient_lookup`, when
    its table's gradient can be added as rows (see :class:`RowGradientHooks`); else None (unchanged)."""
    # A compiled graph keeps torch's backward: AOTAutograd traces the lookup, and its dense gradient
    # leaves the graph before AccumulateGrad (the check is constant to dynamo: no guard, no recompile).
    if _compiling() or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
        return None
    weight = module.weight
    if module.sparse or not (weight.requires_grad and weight.is_leaf) or weight._backward_hooks:
        return None  # a sparse gradient of its own, no gradient, or tensor hooks that expect the dense one
    if not has_dense_gradient(weight):
        return None  # nothing dense to add into (the first pass makes .grad; a DTensor shard; a sparse .grad)
    ids = args[0] if args else kwargs.get("input")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        return None  # a subclass called with something else (BART's positions take the embeddings' shape)
    if ids.numel() >= weight.shape[0] or not row_gradients_enabled():
        return None  # as many lookups as rows: the dense gradient is no larger
    if type(module).forward is not nn.Embedding.forward and not hasattr(module, "embed_scale"):
        return None  # a forward of its own (positions computed from the input's shape...): not re-run here
    scale = known_lookup_scale(module, ids, output)
    if scale is None:  # a forward of its own that is not a scaled lookup: leave it to torch
        return None
    return on_output(row_gradient_lookup(weight, ids, module.padding_idx, module.scale_grad_by_freq), scale)


# Per module: [owners, hook handle]. Several fastadv objects on one model share one hook.
_row_gradient_hooks: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


class RowGradientHooks:
    """Makes every nn.Embedding of a model add its weight gradient into a dense ``.grad`` as rows.

    Each module gets one forward hook, run before any other: while its table's ``.grad`` holds a
    dense gradient (every pass after a step's first, every pass with
    ``zero_grad(set_to_none=False)``), its output is remade by
    :func:`fastadv.ops.row_gradient_lookup`, so the backward adds one sum per distinct row into
    ``.grad`` (bitwise torch's numbers on the CPU) instead of building a V x d gradient and adding
    that. The output's values are the module's own. Left to torch: the first pass (``.grad`` is None:
    the dense gradient becomes ``.grad``), tables with tensor hooks on the weight (they are handed the
    gradient), frozen or non-leaf weights, batches with as many ids as the table has rows, modules
    whose forward is not a (scaled) lookup, and torch.compile'd graphs. ``FASTADV_ROW_GRADIENTS=0``
    turns it off.

    Several fastadv objects on one model share the hooks; :meth:`remove` takes this object's share.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = weakref.WeakSet()
        for module in model.modules():
            if not isinstance(module, nn.Embedding):
                continue
            entry = _row_gradient_hooks.get(module)
            if entry is None:
                handle = module.register_forward_hook(_on_lookup, with_kwargs=True, prepend=True)
                entry = _row_gradient_hooks[module] = [0, handle]
            entry[0] += 1
            self._modules.add(module)

    def remove(self) -> None:
        for module in list(self._modules):
            entry = _row_gradient_hooks.get(module)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    entry[1].remove()
                    del _row_gradient_hooks[module]
        self._modules = weakref.WeakSet()

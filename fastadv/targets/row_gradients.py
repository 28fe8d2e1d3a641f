"""Passes into a table whose ``.grad`` is dense add the table's gradient as the batch's rows.

The forward hook of :class:`RowGradientHooks` remakes a lookup's output through
:func:`fastadv.ops.row_gradient_lookup` where that is exact; ``FASTADV_ROW_GRADIENTS=0`` turns it off.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from ..ops.lookup import has_dense_gradient, row_gradient_lookup
from .scale import known_lookup_scale, on_output

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

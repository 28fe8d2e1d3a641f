"""Passes into a table whose ``.grad`` is dense add the table's gradient as the batch's rows.

While a :class:`fastadv.targets.hook.RowGradientHooks` asks for it, the lookup hook remakes a
lookup's output through :func:`fastadv.ops.row_gradient_lookup` where that is exact and pays:
``FASTADV_ROW_GRADIENTS`` unset (or ``auto``) leaves a CPU table of fewer than
:data:`CPU_MIN_ROW_ELEMENTS` elements to torch's dense backward; ``1`` takes the rows wherever they are
exact, ``0`` nowhere.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..ops.lookup import has_dense_gradient, row_gradient_lookup
from .scale import known_lookup_scale, on_output

ROW_GRADIENTS_VARIABLE = "FASTADV_ROW_GRADIENTS"
# On a CPU the rows' fixed work (a Python autograd Function, a sort of the ids, a sparse add: about 120 us
# with 64 ids on the CI machine) costs more than the dense backward of a small table (71 us at 2,000 x 32,
# 89 us at 4,000 x 32), and less from about this size on (128 us against 161 us at 2,000 x 128; 0.16 ms
# against 35 ms at BERT-base's 21,128 x 768). GPUs take the rows at every size: not measured there yet.
CPU_MIN_ROW_ELEMENTS = 1 << 18


def row_gradients_wanted(weight: torch.Tensor) -> bool:
    """Whether lookups into ``weight`` (with a dense ``.grad``) should give their gradient as rows, by
    ``FASTADV_ROW_GRADIENTS`` (read at each lookup): unset, empty or ``auto``: yes, but for a CPU table of
    fewer than :data:`CPU_MIN_ROW_ELEMENTS` elements; ``1``: yes; ``0``: no, torch's dense embedding backward."""
    value = os.environ.get(ROW_GRADIENTS_VARIABLE, "auto").strip()
    if value not in ("0", "1", "", "auto"):
        raise ValueError(
            f"{ROW_GRADIENTS_VARIABLE}={value!r}: set it to auto (the default: the rows where they pay), 1 (the "
            "rows wherever they are exact) or 0 (torch's dense backward)."
        )
    if value in ("", "auto"):
        return weight.device.type != "cpu" or weight.numel() >= CPU_MIN_ROW_ELEMENTS
    return value == "1"


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def _table_takes_rows(module: nn.Module) -> bool:
    """The table's gradient could be added as rows: a trainable leaf with a dense gradient of its own (not
    ``sparse=True``) and no tensor hooks (they expect the dense gradient)."""
    weight = module.weight
    return not module.sparse and weight.requires_grad and weight.is_leaf and not weight._backward_hooks


def _forward_is_a_lookup(module: nn.Module) -> bool:
    """nn.Embedding's forward or a scaled one: a forward of its own (positions computed from the input's
    shape...) is not re-run here."""
    return type(module).forward is nn.Embedding.forward or hasattr(module, "embed_scale")


def remade_lookup(module: nn.Module, ids: object, output: object) -> torch.Tensor | None:
    """The module's output again, through :func:`fastadv.ops.row_gradient_lookup`, when its table's
    gradient can be added as rows (see :class:`fastadv.targets.hook.RowGradientHooks`); else None (unchanged)."""
    # A compiled graph keeps torch's backward: AOTAutograd traces the lookup, and its dense gradient
    # leaves the graph before AccumulateGrad (the check is constant to dynamo: no guard, no recompile).
    if _compiling() or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
        return None
    weight = module.weight
    if not _table_takes_rows(module):
        return None  # a sparse gradient of its own, no gradient, or tensor hooks that expect the dense one
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        return None  # a subclass called with something else (BART's positions take the embeddings' shape)
    if ids.numel() >= weight.shape[0] or not row_gradients_wanted(weight):
        return None  # as many lookups as rows: the dense gradient is no larger; or a table the rows do not pay on
    if not has_dense_gradient(weight):  # after the cheaper tests: reading .grad makes a Python object of it
        return None  # nothing dense to add into (the first pass makes .grad; a DTensor shard; a sparse .grad)
    if not _forward_is_a_lookup(module):
        return None
    scale = known_lookup_scale(module, ids, output)
    if scale is None:  # a forward of its own that is not a scaled lookup: leave it to torch
        return None
    return on_output(row_gradient_lookup(weight, ids, module.padding_idx, module.scale_grad_by_freq), scale)


def prepare_dense_gradient(module: nn.Module) -> torch.Tensor | None:
    """Give ``module``'s table a zero ``.grad`` when it has none and its lookups would then add their gradient as
    rows (see :func:`remade_lookup`); returns the weight so given (the caller takes it back if its step fails),
    else None.

    For a step whose one backward runs through several lookups of the table (VAT, SMART and R3F: the clean and
    the perturbed forwards): torch's backward would zero-fill a V x d gradient for each and add them up; with a
    dense ``.grad`` there is one zero fill, and each lookup adds its rows. The same numbers: each row is
    ``0 + sum_1 + sum_2``, as torch's ``sum_1 + sum_2``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.grad is not None or not hasattr(module, "sparse"):
        return None
    if type(weight) not in (torch.Tensor, nn.Parameter) or hasattr(weight, "ds_id") or hasattr(weight, "grad_accum"):
        return None  # an FSDP2 shard or a DeepSpeed parameter: their engines make and own the gradient
    if not _table_takes_rows(module) or _compiling() or not _forward_is_a_lookup(module):
        return None
    if not row_gradients_wanted(weight):
        return None
    weight.grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    return weight

"""Choosing the targets: what ``emb_name`` and ``target='auto' | 'weight' | 'output'`` perturb."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

from torch import nn

from ..distributed import data_parallel_group_of_shard, row_shard
from ..errors import EmbeddingNotFoundError, FrozenEmbeddingError, WeightRowsUnavailableError
from .base import Target
from .output import OutputTarget
from .recorder import LookupRecorder
from .tables import (
    EmbeddingTable,
    embedding_like_names,
    input_table,
    match_parameters,
    shared_parameter_names,
    tied_names,
)
from .weight import OUTPUT_MODE_HINT, WeightTarget

TargetMode = Literal["auto", "weight", "output"]
logger = logging.getLogger("fastadv")


def resolve_targets(
    model: nn.Module,
    emb_name: str | None,
    recorders: dict[int, LookupRecorder],
    mode: TargetMode = "weight",
    share_rows: bool = True,
    outputs: dict[object, OutputTarget] | None = None,
    group: object | None = None,
    weight_rows_refusal: str | None = None,
) -> list[Target]:
    """The places to perturb.

    emb_name None: the input embedding's table, at every module that looks it up. Otherwise, as the
    snippet does, every parameter whose name contains ``emb_name`` (see :func:`match_parameters`):
    embedding tables on their touched rows (weight mode) or at their lookups' outputs (output mode),
    any other trainable parameter (e.g. a LayerNorm weight under emb_name='emb') whole, in weight
    mode. ``mode='auto'`` keeps weight rows where that is valid and exact (trainable, not tied to an
    output projection, every lookup named, unsharded or sharded by rows as FSDP2 does) and perturbs
    the lookups' outputs elsewhere, logged at INFO.
    ``outputs`` caches one OutputTarget (one set of hooks) per table and modules across calls.
    ``group``: the DDP process group that averages the gradients (see fastadv.distributed).
    ``weight_rows_refusal``: why the engine rules weight rows out for every table (DeepSpeed: its gradient is in
    ZeRO's buffers); 'auto' then perturbs the lookups' outputs, and 'weight' raises.
    """
    outputs = {} if outputs is None else outputs
    if emb_name is None:
        entries: list[EmbeddingTable | tuple[str, nn.Parameter]] = [input_table(model)]
    else:
        entries, idle = match_parameters(model, emb_name)
        if not entries:
            if idle:
                raise EmbeddingNotFoundError(
                    f"emb_name={emb_name!r} matches only {', '.join(repr(n) for n in idle)}, which forward never "
                    "looks up (PEFT keeps the frozen original beside the trained copy of modules_to_save). Name the "
                    "copy in use (its name has 'modules_to_save'), or pass emb_name=None for the input embedding."
                )
            found = ", ".join(f"'{n}'" for n in embedding_like_names(model)) or "none"
            raise EmbeddingNotFoundError(
                f"emb_name={emb_name!r} matches no parameter of {type(model).__name__}, so nothing would be "
                f"perturbed. Embedding-like parameters found: {found}. Pass a substring of one of them, or "
                "emb_name=None for the input embedding."
            )
    targets: list[Target] = []
    for entry in entries:
        if not isinstance(entry, EmbeddingTable):  # not an embedding table: perturbed whole, as the snippet does
            name, param = entry
            if not param.requires_grad:
                continue
            if weight_rows_refusal is not None:
                raise EmbeddingNotFoundError(
                    f"emb_name={emb_name!r} matches '{name}', which is not the weight of an nn.Embedding, and its "
                    f"weight cannot be perturbed here: {weight_rows_refusal}. Pass an emb_name that matches embedding "
                    "tables only, perturbed at their lookups' outputs (target='output' or 'auto')."
                )
            if mode == "output":
                raise EmbeddingNotFoundError(
                    f"target='output' perturbs embedding lookups, and '{name}' is not the weight of an nn.Embedding. "
                    "Pass an emb_name that matches embedding tables only, or use target='weight' or 'auto'."
                )
            targets.append(WeightTarget(name, param, None, group))
            continue
        table = entry
        if mode == "weight" and weight_rows_refusal is not None:
            raise WeightRowsUnavailableError(
                f"target='weight' perturbs the rows of '{table.name}', and {weight_rows_refusal}. Use "
                "target='output' (the default 'auto' chooses it here): it perturbs the lookups' outputs, which needs "
                "neither the weight nor its gradient."
            )
        reason = weight_rows_refusal or (_output_mode_reason(model, table) if mode != "weight" else None)
        if mode == "output" or reason is not None:
            if mode == "auto":
                logger.info(
                    "fastadv: perturbing the lookups of '%s' in %s (target='output'): %s.",
                    table.name, table.module_names, reason,
                )  # fmt: skip
            key = (id(table.weight), *(id(m) for _, m in table.modules))
            if key not in outputs:
                outputs[key] = OutputTarget(table.name, [m for _, m in table.modules], share_rows)
            outputs[key].group = group or data_parallel_group_of_shard(table.weight)
            targets.append(outputs[key])
        elif table.weight.requires_grad or emb_name is None:
            recorder = _recorder_of_table(table.name, table.weight, recorders)
            targets.append(WeightTarget(table.name, table.weight, recorder, group))
    if not targets:
        names = ", ".join(f"'{e.name if isinstance(e, EmbeddingTable) else e[0]}'" for e in entries)
        raise FrozenEmbeddingError(
            f"emb_name={emb_name!r} matches only frozen parameters ({names}), so nothing would be perturbed. "
            f"Unfreeze them with requires_grad_(True), or {OUTPUT_MODE_HINT}."
        )
    for target in targets:
        if isinstance(target, WeightTarget):
            target.check_trainable()
    return targets


def _output_mode_reason(model: nn.Module, table: EmbeddingTable) -> str | None:
    """Why weight-row perturbation would be wrong for this table (None when it is valid and exact)."""
    if not table.weight.requires_grad:
        return "the embedding is frozen, so its weight has no gradient"
    try:
        row_shard(table.weight)
    except ValueError as err:
        return str(err)
    tied = tied_names(model, table.weight)
    if tied:
        return f"the embedding is tied to {', '.join(repr(n) for n in tied)}, which weight rows would perturb too"
    if not table.every_lookup:
        return f"only the lookups in {table.module_names} are named, and weight rows would perturb every lookup"
    return None


def _recorder_of_table(name: str, weight: nn.Parameter, recorders: dict[int, LookupRecorder]) -> LookupRecorder:
    """The recorder of an embedding table; a table without one would silently cost a dense V x d pass."""
    recorder = recorders.get(id(weight))
    if recorder is None:
        raise EmbeddingNotFoundError(
            f"'{name}' is an embedding table that fastadv does not watch: it was added to the model after the "
            "fastadv object was created, or the object's hooks were removed. Create the fastadv object after "
            "the model is built, and keep it for the whole training run."
        )
    return recorder


def tied_targets(model: nn.Module, targets: list[Target]) -> Iterator[tuple[WeightTarget, list[str]]]:
    """Row targets whose weight also serves as something other than a lookup (tied input/output
    embeddings), with every name the weight has."""
    for target in targets:
        if not isinstance(target, WeightTarget) or target.recorder is None:
            continue
        if tied_names(model, target.param):
            yield target, shared_parameter_names(model, target.param)

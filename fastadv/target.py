"""Where a perturbation lives: the touched rows of an embedding weight, or a whole parameter.

This layer finds the embedding, records which rows of each table can have a gradient, checks for
frozen and tied weights, and perturbs / restores a parameter through ``fastadv.ops``. It decides
nothing about the perturbation's size: methods pass epsilon, the norm and the skip flag.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Literal, Union

import torch
from torch import nn

from .distributed import (
    all_reduce_sum,
    average_rows_over_ranks,
    data_parallel_group_of_shard,
    gather_ids,
    row_shard,
    unwrap_data_parallel,
)
from .errors import EmbeddingNotFoundError, FastAdvWarning, FrozenEmbeddingError, MissingGradientError
from .ops import RowSet, gather_rows, row_set_from_ids, rows_backup_add, rows_l2_norm, rows_pgd_step, rows_restore
from .ops.backend import Backend
from .output_target import Lookups, OutputTarget, gradient_rows

OUTPUT_MODE_HINT = "perturb the embedding's output instead of its weight with target='output' (or 'auto')"
TargetMode = Literal["auto", "weight", "output"]
Target = Union["WeightTarget", OutputTarget]
logger = logging.getLogger("fastadv")


# ---------------------------------------------------------------- finding the embedding


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)]


def embedding_like_names(model: nn.Module) -> list[str]:
    """Parameter names that look like embeddings: nn.Embedding weights and names with emb/wte/tok."""
    names = {f"{n}.weight" if n else "weight" for n, _ in _embedding_modules(model)}
    names |= {n for n, _ in model.named_parameters() if any(k in n.lower() for k in ("emb", "wte", "tok"))}
    return sorted(names)


def find_input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The model's input embedding: ``get_input_embeddings()`` where it has one, else its single nn.Embedding.

    Returns:
        (module name, module). Raises EmbeddingNotFoundError when there is none or several.
    """
    prefix, inner = unwrap_data_parallel(model)
    if inner is not model:
        name, module = find_input_embedding(inner)
        return prefix + name, module
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            module = getter()
        except NotImplementedError:
            module = None
        if isinstance(module, nn.Embedding):
            for name, m in model.named_modules():
                if m is module:
                    return name, module
    candidates = _embedding_modules(model)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise EmbeddingNotFoundError(
            f"{type(model).__name__} has no nn.Embedding module and no get_input_embeddings(). "
            "Pass emb_name= with a substring of the parameter to perturb."
        )
    names = ", ".join(f"'{n}'" for n, _ in candidates)
    raise EmbeddingNotFoundError(
        f"{type(model).__name__} has {len(candidates)} nn.Embedding modules ({names}) and no "
        "get_input_embeddings() to say which is the input. Pass emb_name= with a substring of the one to "
        "perturb, e.g. emb_name='word_embeddings'."
    )


def shared_parameter_names(model: nn.Module, param: nn.Parameter) -> list[str]:
    """Every name under which ``param`` appears in ``model`` (more than one when weights are tied)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


# ---------------------------------------------------------------- which rows have a gradient


class LookupRecorder:
    """Records the token ids of each lookup into one table whose gradient reached the table.

    Invariant: every row with a non-zero gradient in ``weight.grad`` is among the recorded ids.
    An id enters when its lookup's output gradient is computed (so forwards without a backward
    never count), and the record starts afresh at the first backward after ``.grad`` was set to
    None following an accumulation, as ``zero_grad()`` does. Under gradient accumulation the ids
    of every micro-batch since then stay, as their gradients do. A superset is always exact (extra
    rows have a zero gradient), only slower: with ``zero_grad(set_to_none=False)`` the record
    keeps growing, and is compacted (one host sync) whenever it exceeds ``compact_at`` ids.
    """

    # Ids kept before compacting: 64k plus 4 per row (a few MB), far above one reset-to-reset
    # cycle of ordinary training, so compaction means the gradient is not being set to None.
    COMPACT_FLOOR = 65536

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight
        self._ids: list[torch.Tensor] = []
        self._count = 0
        self._accumulated_since_reset = False
        self._warned_growth = False
        self.compact_at = self.COMPACT_FLOOR + 4 * weight.shape[0]
        self.padding_idx: int | None = None  # of the modules looking it up (they agree in practice)
        self._handles: list = []
        self._watching_accumulation = False  # registered at the first lookup that needs a gradient

    def attach(self, module: nn.Module) -> None:
        """Record the lookups of ``module`` (an nn.Embedding whose weight is ``self.weight``)."""
        if self.padding_idx is None:
            self.padding_idx = module.padding_idx
        self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watching_accumulation = False

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and isinstance(output, torch.Tensor)):
            return
        if not self._watching_accumulation:  # a frozen weight refuses this hook, so it waits until now
            self._handles.append(self.weight.register_post_accumulate_grad_hook(self._on_accumulate))
            self._watching_accumulation = True
        ids = (args[0] if args else kwargs["input"]).detach()
        output.register_hook(lambda grad: self._on_backward(ids))

    def _on_backward(self, ids: torch.Tensor) -> None:
        if self.weight.grad is None and self._accumulated_since_reset:
            self._ids.clear()
            self._count = 0
            self._accumulated_since_reset = False
        self._ids.append(ids.reshape(-1))
        self._count += ids.numel()
        if self._count > self.compact_at:
            self._compact()

    def _on_accumulate(self, param: torch.Tensor) -> None:
        self._accumulated_since_reset = True

    def _compact(self) -> None:
        unique = torch.unique(torch.cat(self._ids))
        self._ids = [unique]
        self._count = unique.numel()
        if not self._warned_growth:
            self._warned_growth = True
            warnings.warn(
                f"fastadv has recorded over {self.compact_at} token ids since the embedding's gradient was "
                "last set to None, as happens with zero_grad(set_to_none=False). Results stay exact, but "
                "attack() touches every row seen since, and the record is compacted with a host sync. "
                "Use zero_grad() (set_to_none=True, the default) for the fast path.",
                FastAdvWarning,
                stacklevel=2,
            )

    def ids(self) -> torch.Tensor | None:
        """The recorded ids, 1-D, duplicates included (None when nothing was recorded since the last reset)."""
        if not self._ids:
            return None
        return self._ids[0] if len(self._ids) == 1 else torch.cat(self._ids)

    def row_set(self) -> RowSet | None:
        """The recorded rows (None when nothing was recorded since the last reset)."""
        ids = self.ids()
        return None if ids is None else row_set_from_ids(ids, self.weight.shape[0])


def attach_recorders(model: nn.Module) -> dict[int, LookupRecorder]:
    """One recorder per embedding table of ``model``, keyed by ``id(weight)``.

    Every nn.Embedding is watched, frozen ones too (they may be unfrozen later), so any table can
    be named later, as the snippet allows with ``attack(emb_name=...)``. A lookup that needs a
    gradient costs one tensor hook and one list append; other lookups cost a flag check.
    """
    recorders: dict[int, LookupRecorder] = {}
    for _, module in _embedding_modules(model):
        weight = module.weight
        recorder = recorders.get(id(weight))
        if recorder is None:
            recorder = recorders[id(weight)] = LookupRecorder(weight)
        recorder.attach(module)
    return recorders


# ---------------------------------------------------------------- perturbing a parameter


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A [rows, columns] view of a parameter (1-D: one row), sharing its storage."""
    if t.dim() == 2:
        return t
    if t.dim() == 1:
        return t.view(1, -1)
    return t.view(t.shape[0], -1)


class WeightTarget:
    """One parameter perturbed in place: an embedding table on its recorded rows, any other one whole.

    FGM adds ``epsilon * g / norm`` (or ``epsilon * sign(g)``) to the rows that have a gradient;
    PGD ascends and projects around the rows saved at its round's first step. restore() copies the
    saved rows back bit for bit, into the same storage.
    """

    def __init__(
        self, name: str, param: nn.Parameter, recorder: LookupRecorder | None, group: object | None = None
    ) -> None:
        """``group``: the DDP process group whose ranks average this gradient (their ids are gathered).
        An FSDP2 table (a DTensor sharded by rows) is perturbed on this rank's shard."""
        self.name = name
        self.param = param
        self.recorder = recorder
        self.shard = row_shard(param)
        self.group = self.shard.group if self.shard is not None else group
        self._grad: torch.Tensor | None = None  # set by prepare(): the gradient rows
        self._grad_set: RowSet | None = None  # and where they live
        self._rows: RowSet | None = None  # set by add()/ascend(): the saved rows
        self._backup: torch.Tensor | None = None
        self._backend: Backend | None = None

    def __repr__(self) -> str:
        kind = "rows" if self.recorder is not None else "dense"
        return f"WeightTarget({self.name!r}, {kind}, shape={tuple(self.param.shape)})"

    def check_trainable(self) -> None:
        if not self.param.requires_grad:
            raise FrozenEmbeddingError(
                f"'{self.name}' does not require grad (frozen, e.g. by LoRA/PEFT), so it has no gradient to "
                f"perturb along. Unfreeze it with requires_grad_(True), or {OUTPUT_MODE_HINT}."
            )

    def prepare(self, backend: Backend, lookups: Lookups | None = None, average_over_ranks: bool = False) -> None:
        """Take the gradient and the rows it lives on; raises before anything is modified.

        ``lookups`` (ids, dL/de of each lookup of this table) replaces ``.grad``: the table's
        gradient from those lookups alone, summed per id (PGD's intermediate passes). While a PGD
        round is in progress, the gradient is re-addressed to the rows saved at its first step.
        ``average_over_ranks``: ``.grad`` is this rank's own (a backward under DDP's no_sync); the
        rows it needs are averaged over the DDP group here, U x d instead of the whole model.
        """
        self.check_trainable()
        dense = False
        if lookups is not None:
            if self.recorder is None:
                raise MissingGradientError(f"'{self.name}' is not an embedding table: it has no lookups.")
            grad_set, grad = gradient_rows(
                lookups, self.param.shape[0], self.recorder.padding_idx, True, backend, self.name
            )
            if self.group is not None:  # dL/de is this rank's own: average the rows over the ranks
                grad, grad_set = self._averaged_over_ranks(lookups, grad, grad_set)
        else:
            grad = self.param.grad
            if grad is None:
                raise MissingGradientError(
                    f"'{self.name}' has no gradient: call loss.backward() on the clean loss before attack()."
                )
            if self.shard is not None:
                grad = grad.to_local()
            if grad.is_sparse:  # nn.Embedding(sparse=True): the gradient names its own rows
                grad = grad.coalesce()
                values = grad.values()
                grad_set = RowSet(grad.indices()[0], torch.arange(values.shape[0], device=values.device))
                grad = values.reshape(values.shape[0], -1)
            elif self.recorder is not None:
                ids = self.recorder.ids()
                if ids is None:
                    raise MissingGradientError(
                        f"'{self.name}' has a gradient, but fastadv saw no lookup of it since the gradient was "
                        "last reset. Create the fastadv object before the forward pass whose gradient it uses."
                    )
                grad_set, dense = row_set_from_ids(self._rows_of_this_rank(ids), grad.shape[0]), True
            else:
                grad = _as_matrix(grad)
                all_rows = torch.arange(grad.shape[0], device=grad.device)
                grad_set, dense = RowSet(all_rows, all_rows), True
        if average_over_ranks:
            if self.group is None or self.shard is not None or not dense:
                raise ValueError(
                    f"averaging '{self.name}''s gradient rows over ranks needs a table replicated by DDP (pass the "
                    "DDP-wrapped model), with a dense gradient."
                )
            world = torch.distributed.get_world_size(self.group)
            grad = all_reduce_sum(grad.index_select(0, grad_set.grad_rows), self.group).div_(world)
            grad_set, dense = grad_set.as_slots(), False
        if self._rows is not None:  # a PGD round: the gradient on the saved rows' slots
            if dense:  # a dense gradient can be read at any row
                grad_set = RowSet(self._rows.rows, self._rows.rows, self._rows.first)
            else:
                grad, grad_set = gather_rows(grad, grad_set, self._rows.rows), self._rows.as_slots()
        self._grad, self._grad_set = grad, grad_set

    def gradient_norm(self, backend: Backend) -> torch.Tensor:
        """fp32 0-dim: the L2 norm of the gradient (over its non-zero rows; every shard's under FSDP2)."""
        assert self._grad is not None and self._grad_set is not None, "prepare() first"
        norm = rows_l2_norm(self._grad, self._grad_set, backend)
        if self.shard is None:
            return norm
        return all_reduce_sum(norm.square().reshape(1), self.shard.group).sqrt().reshape(())

    def _rows_of_this_rank(self, ids: torch.Tensor) -> torch.Tensor:
        """The recorded ids whose rows hold this rank's gradient: every rank's under DDP and FSDP2,
        and under FSDP2 those of this rank's shard, as local rows."""
        if self.group is not None:
            ids = gather_ids(ids, self.group)
        if self.shard is not None:
            ids = ids.to(torch.int64)
            start, stop = self.shard.start, self.shard.start + self.shard.rows
            ids = ids[(ids >= start) & (ids < stop)] - start  # one host sync, as gather_ids has
        return ids

    def _averaged_over_ranks(
        self, lookups: Lookups, grad: torch.Tensor, grad_set: RowSet
    ) -> tuple[torch.Tensor, RowSet]:
        """This rank's per-id gradient rows averaged over the group, on the rows of every rank's ids
        (under FSDP2, then cut to this rank's shard, as local rows)."""
        ids = torch.cat([i.reshape(-1) for i, _ in lookups])
        summed, rows = average_rows_over_ranks(ids, self.param.shape[0], grad, grad_set, self.group)
        if self.shard is None:
            return summed, rows
        start, stop = self.shard.start, self.shard.start + self.shard.rows
        keep = (rows.rows >= start) & (rows.rows < stop)  # one host sync, as gather_ids has
        first = None if rows.first is None else rows.first[keep]
        local = RowSet(rows.rows[keep] - start, torch.arange(int(keep.sum()), device=keep.device), first)
        return summed[keep], local

    def _weight(self) -> torch.Tensor:
        """The table as a [rows, columns] matrix sharing the parameter's storage (this rank's shard under FSDP2)."""
        return _as_matrix(self.param.data.to_local() if self.shard is not None else self.param.data)

    def add(self, epsilon: float, norm: torch.Tensor, ok: torch.Tensor, sign: bool, backend: Backend) -> None:
        """FGM: save the rows, then add the perturbation to them in place (unless ``ok`` is False)."""
        assert self._grad is not None and self._grad_set is not None, "prepare() first"
        weight = self._weight()
        self._backup = rows_backup_add(weight, self._grad, self._grad_set, norm, ok, epsilon, sign, backend)
        self._rows, self._backend = self._grad_set, backend
        self._grad = self._grad_set = None  # the gradient is not ours to keep alive

    def ascend(self, alpha: float, epsilon: float, norm: torch.Tensor, ok: torch.Tensor, backend: Backend) -> None:
        """PGD: one step of ``alpha * g / norm`` on the rows, projected into the epsilon ball around
        the rows saved at the round's first step (which this call saves when it is that step)."""
        assert self._grad is not None and self._grad_set is not None, "prepare() first"
        weight = self._weight()
        self._backup = rows_pgd_step(
            weight, self._grad, self._grad_set, self._backup, norm, ok, alpha, epsilon, backend
        )
        if self._rows is None:
            self._rows = self._grad_set
        self._backend = backend
        self._grad = self._grad_set = None

    def restore(self) -> None:
        """Copy the saved rows back into the parameter's own storage, bit for bit."""
        assert self._backup is not None and self._rows is not None, "add() first"
        rows_restore(self._weight(), self._backup, self._rows, self._backend)
        self._backup = self._rows = self._backend = None


def resolve_targets(
    model: nn.Module,
    emb_name: str | None,
    recorders: dict[int, LookupRecorder],
    mode: TargetMode = "weight",
    share_rows: bool = True,
    outputs: dict[int, OutputTarget] | None = None,
    group: object | None = None,
) -> list[Target]:
    """The places to perturb.

    emb_name None: the input embedding. Otherwise, as the snippet does, every parameter whose name
    contains ``emb_name``: embedding tables on their touched rows (weight mode) or their output
    (output mode), any other trainable parameter (e.g. a LayerNorm weight under emb_name='emb')
    whole, in weight mode. ``mode='auto'`` keeps weight rows where that is valid and exact
    (trainable, not tied, unsharded or sharded by rows as FSDP2 does) and perturbs the output
    elsewhere, logged once at INFO.
    ``outputs`` caches one OutputTarget (one hook) per module across calls. ``group``: the DDP
    process group that averages the gradients (see fastadv.distributed).
    """
    outputs = {} if outputs is None else outputs
    tables = {id(m.weight): (n, m) for n, m in _embedding_modules(model)}
    if emb_name is None:
        module_name, module = find_input_embedding(model)
        matched = [(f"{module_name}.weight" if module_name else "weight", module.weight)]
    else:
        if not isinstance(emb_name, str) or not emb_name:
            raise EmbeddingNotFoundError(f"emb_name must be a non-empty string, found {emb_name!r}.")
        matched = [(n, p) for n, p in model.named_parameters() if emb_name in n]
        if not matched:
            found = ", ".join(f"'{n}'" for n in embedding_like_names(model)) or "none"
            raise EmbeddingNotFoundError(
                f"emb_name={emb_name!r} matches no parameter of {type(model).__name__}, so nothing would be "
                f"perturbed. Embedding-like parameters found: {found}. Pass a substring of one of them, or "
                "emb_name=None for the input embedding."
            )
    targets: list[Target] = []
    for name, param in matched:
        table = tables.get(id(param))
        if table is None:  # not an embedding table: perturbed whole, in weight mode, as the snippet does
            if not param.requires_grad:
                continue
            if mode == "output":
                raise EmbeddingNotFoundError(
                    f"target='output' perturbs embedding lookups, and '{name}' is not the weight of an nn.Embedding. "
                    "Pass an emb_name that matches embedding tables only, or use target='weight' or 'auto'."
                )
            targets.append(WeightTarget(name, param, None, group))
            continue
        reason = _output_mode_reason(model, param) if mode != "weight" else None
        if mode == "output" or reason is not None:
            if mode == "auto":
                logger.info("fastadv: perturbing the output of '%s' (target='output'): %s.", name, reason)
            module = table[1]
            if id(module) not in outputs:
                outputs[id(module)] = OutputTarget(name, module, share_rows)
            outputs[id(module)].group = group or data_parallel_group_of_shard(param)
            targets.append(outputs[id(module)])
        elif param.requires_grad or emb_name is None:
            targets.append(WeightTarget(name, param, _recorder_of_table(name, param, recorders), group))
    if not targets:
        names = ", ".join(f"'{n}'" for n, _ in matched)
        raise FrozenEmbeddingError(
            f"emb_name={emb_name!r} matches only frozen parameters ({names}), so nothing would be perturbed. "
            f"Unfreeze them with requires_grad_(True), or {OUTPUT_MODE_HINT}."
        )
    for target in targets:
        target.check_trainable()
    return targets


def _output_mode_reason(model: nn.Module, weight: nn.Parameter) -> str | None:
    """Why weight-row perturbation would be wrong for this table (None when it is valid and exact)."""
    if not weight.requires_grad:
        return "the embedding is frozen, so its weight has no gradient"
    try:
        row_shard(weight)
    except ValueError as err:
        return str(err)
    names = shared_parameter_names(model, weight)
    if len(names) > 1:
        return f"the embedding is tied to {', '.join(repr(n) for n in names[1:])}, which weight rows would perturb too"
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
    """Row targets whose weight is also used under another name (tied input/output embeddings)."""
    for target in targets:
        if not isinstance(target, WeightTarget) or target.recorder is None:
            continue
        names = shared_parameter_names(model, target.param)
        if len(names) > 1:
            yield target, names

"""Where a perturbation lives: the touched rows of an embedding weight, or a whole parameter.

This layer finds the embedding, records which rows of each table can have a gradient, checks for
frozen and tied weights, and perturbs / restores a parameter through ``fastadv.ops``. It decides
nothing about the perturbation's size: methods pass epsilon, the norm and the skip flag.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

from .distributed import (
    all_reduce_sum,
    average_rows_over_ranks,
    data_parallel_forward,
    data_parallel_group_of_shard,
    gather_ids,
    row_shard,
    unwrap_data_parallel,
)
from .errors import EmbeddingNotFoundError, FastAdvWarning, FrozenEmbeddingError, MissingGradientError
from .lookups import embedding_modules, table_modules
from .ops import RowSet, gather_rows, row_set_from_ids, rows_backup_add, rows_l2_norm, rows_pgd_step, rows_restore
from .ops.backend import Backend, resolve_backend
from .output_target import Lookups, OutputTarget, gradient_rows

OUTPUT_MODE_HINT = "perturb the embedding's output instead of its weight with target='output' (or 'auto')"
TargetMode = Literal["auto", "weight", "output"]
Target = Union["WeightTarget", OutputTarget]
logger = logging.getLogger("fastadv")
_ENGINE = torch.autograd.Variable._execution_engine  # queue_callback: run fn at the end of this backward


# ---------------------------------------------------------------- finding the embedding


def embedding_like_names(model: nn.Module) -> list[str]:
    """Parameter names that look like embeddings: nn.Embedding weights and names with emb/wte/tok."""
    names = {f"{n}.weight" if n else "weight" for n, _ in embedding_modules(model)}
    names |= {n for n, _ in model.named_parameters() if any(k in n.lower() for k in ("emb", "wte", "tok"))}
    return sorted(names)


def find_input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The model's input embedding: ``get_input_embeddings()`` where it has one, else its single nn.Embedding.

    Looks through DistributedDataParallel and nn.DataParallel wrappers, and through PEFT's wrappers
    (``get_input_embeddings()`` of a model with ``modules_to_save=["embed_tokens"]`` returns a
    wrapper whose active copy is the embedding forward calls).

    Returns:
        (module name, module). Raises EmbeddingNotFoundError when there is none or several.
    """
    prefix, inner = unwrap_data_parallel(model)
    if inner is model and isinstance(model, nn.DataParallel):
        prefix, inner = "module.", model.module
    if inner is not model:
        name, module = find_input_embedding(inner)
        return prefix + name, module
    candidates = embedding_modules(model)
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except NotImplementedError:
            found = None
        if isinstance(found, nn.Module):
            inside = {id(m) for m in found.modules()}
            within = [(n, m) for n, m in candidates if id(m) in inside]
            if len(within) == 1:  # the module itself, or the one a wrapper runs (PEFT, LoRA's base_layer)
                return within[0]
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


def tied_names(model: nn.Module, weight: nn.Parameter) -> list[str]:
    """The names under which a table's weight serves something other than a lookup (an output
    projection tied to it, as GPT-2's lm_head): weight rows perturbed would perturb those too."""
    lookups = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return [n for n in shared_parameter_names(model, weight) if n not in lookups]


@dataclass(frozen=True)
class TableLookups:
    """A table and the modules whose lookups of it are to be perturbed.

    Attributes:
        name: the weight's name (the first under which the model lists it).
        weight: the table, [V, d].
        modules: (name, module) of the lookups named, in model order.
        every_lookup: whether ``modules`` are all the modules that look the table up (weight rows
            perturb every lookup; output mode can perturb a subset).
    """

    name: str
    weight: nn.Parameter
    modules: tuple[tuple[str, nn.Embedding], ...]
    every_lookup: bool

    @property
    def module_names(self) -> str:
        return ", ".join(f"'{n}'" for n, _ in self.modules)


def input_table(model: nn.Module) -> TableLookups:
    """The input embedding's table with every module that looks it up (T5, BART: the encoder's and the
    decoder's, besides ``shared``, which forward never calls)."""
    module_name, module = find_input_embedding(model)
    modules = table_modules(model, module.weight) or [(module_name, module)]
    names = shared_parameter_names(model, module.weight)
    return TableLookups(names[0] if names else f"{module_name}.weight", module.weight, tuple(modules), True)


def match_parameters(
    model: nn.Module, emb_name: str
) -> tuple[list[TableLookups | tuple[str, nn.Parameter]], list[str]]:
    """The parameters whose name contains ``emb_name``, as the snippet matches them, aliases included.

    A table shared by several modules is listed under each module's name as well (T5's
    'encoder.embed_tokens.weight' is 'shared.weight'): a match through a module's name names that
    module's lookups; a match through the table's own (first) name names all of them.

    Returns:
        (matches in the model's order: a TableLookups for each table, (name, parameter) for any
        other parameter; the names matched that forward never looks up: PEFT's idle copies).
    """
    if not isinstance(emb_name, str) or not emb_name:
        raise EmbeddingNotFoundError(f"emb_name must be a non-empty string or None, found {emb_name!r}.")
    first_names: dict[int, str] = {}
    matched: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first_names.setdefault(id(param), name)
        if emb_name in name:
            matched.setdefault(id(param), (param, []))[1].append(name)
    running = {id(m) for _, m in embedding_modules(model)}
    entries: list[TableLookups | tuple[str, nn.Parameter]] = []
    idle: list[str] = []
    for key, (param, names) in matched.items():
        users = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is param]
        if not users:
            entries.append((first_names[key], param))
            continue
        modules = [(n, m) for n, m in users if id(m) in running]
        if not modules:
            idle += names
            continue
        named = [(n, m) for n, m in modules if (f"{n}.weight" if n else "weight") in names]
        every = first_names[key] in names or not named
        chosen = modules if every else named
        entries.append(TableLookups(first_names[key], param, tuple(chosen), len(chosen) == len(modules)))
    return entries, idle


def named_tables(model: nn.Module, emb_name: str | None, method: str) -> list[TableLookups]:
    """The tables (with the lookups named) a method acting on embedding outputs perturbs: the input
    embedding's (emb_name None), or each table ``emb_name`` names (see :func:`match_parameters`).
    ``method`` names the caller in the error raised when there is none."""
    if emb_name is None:
        return [input_table(model)]
    entries, idle = match_parameters(model, emb_name)
    tables = [e for e in entries if isinstance(e, TableLookups)]
    if not tables:
        found = ", ".join(f"'{n}.weight'" for n, _ in embedding_modules(model)) or "none"
        never = f" ({', '.join(repr(n) for n in idle)} are never looked up: PEFT's frozen originals)" if idle else ""
        raise EmbeddingNotFoundError(
            f"emb_name={emb_name!r} matches no embedding table of {type(model).__name__}{never}. {method} "
            f"perturbs embedding lookups: pass a substring of one of {found}, or None for the input embedding."
        )
    return tables


# ---------------------------------------------------------------- which rows have a gradient


class LookupRecorder:
    """Records the token ids of each lookup into one table whose gradient reached the table.

    Invariant: every row with a non-zero gradient in ``weight.grad`` is among the recorded ids (a
    superset is exact, the extra rows' gradient being zero, only slower). An id enters when its
    lookup's output gradient is computed, so forwards without a backward never count; under
    gradient accumulation the ids of every micro-batch stay, as their gradients do. At each
    backward, ``.grad`` is compared with what it was at the end of the previous one (after DDP
    wrote its average into it):

    - set to None (``zero_grad()``): no row has a gradient, so the record starts afresh;
    - written in place or replaced (its ``_version`` moved, or it is another tensor): zeroed by
      ``zero_grad(set_to_none=False)``, or scaled by ``clip_grad_norm_`` between micro-batches, or
      put back by PGD's ``restore_grad()``. The ids recorded so far stay until the sum of squares
      of their rows, taken on the device at that moment, reads 0 (a zeroed row stays zero until a
      backward records it again). On CUDA it is read without a sync, once an event says the device
      has computed it (usually by the next step); on other devices at once.

    Should the record keep growing all the same (a zeroing the version counter does not see, as
    ``p.grad.data.zero_()``; an FSDP2 shard, whose rows no rank can check alone; a very long
    accumulation), it is compacted (one host sync) whenever it exceeds ``compact_at`` ids.
    """

    # Ids kept before compacting: 64k plus 4 per row (a few MB), far above one reset-to-reset
    # cycle of ordinary training, so compaction means the gradient's resets are not being seen.
    COMPACT_FLOOR = 65536

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight
        self._ids: list[torch.Tensor] = []  # ids whose rows may hold a gradient
        self._checking: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = []  # CUDA: (ids, any row
        # non-zero, in pinned host memory, the event after which it may be read), oldest first
        self._count = 0  # ids in both
        self._seen: tuple[weakref.ref | None, int] = (None, 0)  # .grad and its version after the last backward
        self._warned_growth = False
        self.compact_at = self.COMPACT_FLOOR + 4 * weight.shape[0]
        self.padding_idx: int | None = None  # of the modules looking it up (they agree in practice)
        self._handles: list = []
        self.data_parallel: nn.Module | None = None  # the DDP wrapper whose forward last looked the table up
        self.looked_up = False  # whether any forward pass has looked the table up

    def attach(self, module: nn.Module) -> None:
        """Record the lookups of ``module`` (an nn.Embedding whose weight is ``self.weight``)."""
        if self.padding_idx is None:
            self.padding_idx = module.padding_idx
        self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        self.looked_up = True
        if (wrapper := data_parallel_forward()) is not None:  # frozen tables too: output mode needs the group
            self.data_parallel = wrapper
        if not (torch.is_grad_enabled() and self.weight.requires_grad and isinstance(output, torch.Tensor)):
            return
        ids = (args[0] if args else kwargs["input"]).detach()
        output.register_hook(lambda grad: self._on_backward(ids))

    def _on_backward(self, ids: torch.Tensor) -> None:
        # Before this backward accumulates into the table: its gradient is still what was left of the last one.
        self._check_gradient()
        self._ids.append(ids.reshape(-1))
        self._count += ids.numel()
        if self._count > self.compact_at:
            self._compact()
        # At the end of this backward, after DDP's own final callback (which writes the averaged gradient
        # into .grad): a callback queued from a final callback runs after every one queued before it.
        _ENGINE.queue_callback(lambda: _ENGINE.queue_callback(self._remember_gradient))

    def _remember_gradient(self) -> None:
        grad = self.weight.grad
        self._seen = (None, 0) if grad is None else (weakref.ref(grad), grad._version)

    def _check_gradient(self) -> None:
        """Trim the record when ``.grad`` changed since the end of the last backward (see the class docstring)."""
        self._collect_checks()
        grad = self.weight.grad
        seen, version = self._seen
        if grad is None:
            changed = seen is not None
        else:
            changed = seen is None or seen() is not grad or grad._version != version
        if not changed:
            return
        if grad is None or grad.is_sparse:  # no gradient left; or one that names its own rows (unread here)
            self._ids, self._checking, self._count = [], [], 0
        elif self._ids and type(grad).__name__ != "DTensor":  # a shard holds some rows only: keep them all
            self._check_rows(grad)
        self._remember_gradient()

    def _check_rows(self, grad: torch.Tensor) -> None:
        """Keep the recorded ids only if a row of theirs is non-zero in ``grad``, without a host sync on CUDA.

        One fp32 sum of squares over their rows: 0 when they were zeroed, and a zero row stays zero
        until a backward records it again. (Rows whose every value is below ~1e-19 also square to 0:
        they are as good as zero to the attack's own fp32 norm.) NaN/Inf keep them.
        """
        ids = self._ids[0] if len(self._ids) == 1 else torch.cat(self._ids)
        self._ids = []
        rows = row_set_from_ids(ids, self.weight.shape[0])
        alive = rows_l2_norm(_as_matrix(grad), rows, resolve_backend(grad.device)) != 0
        if not grad.is_cuda:
            if alive:
                self._ids.append(ids)
            else:
                self._count -= ids.numel()
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(alive, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._checking.append((ids, host, ready))

    def _collect_checks(self) -> None:
        """Drop the ids whose rows the device has found zero, put back those it found non-zero; never waits."""
        while self._checking and self._checking[0][2].query():
            ids, alive, _ = self._checking.pop(0)
            if alive:
                self._ids.append(ids)
            else:
                self._count -= ids.numel()

    def _compact(self) -> None:
        unique = torch.unique(self.ids())
        self._ids, self._checking = [unique], []
        self._count = unique.numel()
        if not self._warned_growth:
            self._warned_growth = True
            warnings.warn(
                f"fastadv has recorded over {self.compact_at} token ids since it last saw the embedding's "
                "gradient reset: neither set to None (zero_grad()) nor zeroed where torch's version counter "
                "shows it (zero_grad(set_to_none=False) does; p.grad.data.zero_() does not), or sharded by FSDP2, "
                "or accumulated over that many micro-batches. Results stay exact, but attack() touches every row "
                "seen since, and the record is compacted with a host sync. Zero the gradients with zero_grad() "
                "for the fast path.",
                FastAdvWarning,
                stacklevel=2,
            )

    def ids(self) -> torch.Tensor | None:
        """The recorded ids, 1-D, duplicates included (None when nothing was recorded since the last reset).

        Ids whose check is still running on the device are included: a superset is exact."""
        self._collect_checks()
        parts = self._ids + [ids for ids, _, _ in self._checking]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def add_ids(self, ids: torch.Tensor | None) -> None:
        """Count the rows of ``ids`` as holding a gradient again: a gradient saved with them was put back
        in ``.grad`` (PGD's restore_grad())."""
        if ids is not None:
            self._ids.append(ids)
            self._count += ids.numel()

    @property
    def count(self) -> int:
        """How many ids the record holds (duplicates included, those being checked too): what attack() sorts."""
        return self._count

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
    for module in model.modules():  # PEFT's idle copies too: an adapter switch may make one active
        if not isinstance(module, nn.Embedding):
            continue
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
                never = (
                    f" If you did: no forward pass has looked '{self.name}' up since fastadv began watching, so the "
                    "model's forward uses another embedding (get_input_embeddings() may return a module forward "
                    "never calls, as BART's `shared` with tie_word_embeddings=False). Pass emb_name= naming the "
                    "embedding forward uses, e.g. emb_name='encoder.embed_tokens'."
                    if self.recorder is not None and not self.recorder.looked_up
                    else ""
                )
                raise MissingGradientError(
                    f"'{self.name}' has no gradient: call loss.backward() on the clean loss before attack().{never}"
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
    outputs: dict[object, OutputTarget] | None = None,
    group: object | None = None,
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
    """
    outputs = {} if outputs is None else outputs
    if emb_name is None:
        entries: list[TableLookups | tuple[str, nn.Parameter]] = [input_table(model)]
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
        if not isinstance(entry, TableLookups):  # not an embedding table: perturbed whole, as the snippet does
            name, param = entry
            if not param.requires_grad:
                continue
            if mode == "output":
                raise EmbeddingNotFoundError(
                    f"target='output' perturbs embedding lookups, and '{name}' is not the weight of an nn.Embedding. "
                    "Pass an emb_name that matches embedding tables only, or use target='weight' or 'auto'."
                )
            targets.append(WeightTarget(name, param, None, group))
            continue
        table = entry
        reason = _output_mode_reason(model, table) if mode != "weight" else None
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
        names = ", ".join(f"'{e.name if isinstance(e, TableLookups) else e[0]}'" for e in entries)
        raise FrozenEmbeddingError(
            f"emb_name={emb_name!r} matches only frozen parameters ({names}), so nothing would be perturbed. "
            f"Unfreeze them with requires_grad_(True), or {OUTPUT_MODE_HINT}."
        )
    for target in targets:
        target.check_trainable()
    return targets


def _output_mode_reason(model: nn.Module, table: TableLookups) -> str | None:
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

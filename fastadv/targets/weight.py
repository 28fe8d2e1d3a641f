"""Weight mode: a parameter perturbed in place, an embedding table on its recorded rows, any other one whole."""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import all_reduce_sum, average_rows_over_ranks, gather_ids, row_shard
from ..errors import AttackStateError, FastAdvWarning, FrozenEmbeddingError, MissingGradientError
from ..ops import RowSet, gather_rows, row_set_from_ids, rows_backup_add, rows_pgd_step, rows_restore
from ..ops.backend import Backend
from .base import Gradient, Step
from .gradients import LookupGradients, gradient_rows
from .recorder import LookupRecorder
from .tables import as_matrix

OUTPUT_MODE_HINT = "perturb the embedding's output instead of its weight with target='output' (or 'auto')"


# The weight-row perturbations in force on each table, oldest first (their saved rows). A perturbation saves
# the rows as the ones before it left them, so they come off newest first: restoring an older one first would
# leave the newer one's saved rows, perturbed by the older, to be written back. By the table's id (tensors
# compare by value), forgotten with the table.
_in_force: dict[int, list[torch.Tensor]] = {}


def _perturbations_in_force(table: nn.Parameter) -> list[torch.Tensor]:
    key = id(table)
    if key not in _in_force:
        _in_force[key] = []
        weakref.finalize(table, _in_force.pop, key, None)
    return _in_force[key]


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

    def __repr__(self) -> str:
        kind = "rows" if self.recorder is not None else "dense"
        return f"WeightTarget({self.name!r}, {kind}, shape={tuple(self.param.shape)})"

    def check_trainable(self) -> None:
        if not self.param.requires_grad:
            raise FrozenEmbeddingError(
                f"'{self.name}' does not require grad (frozen, e.g. by LoRA/PEFT), so it has no gradient to "
                f"perturb along. Unfreeze it with requires_grad_(True), or {OUTPUT_MODE_HINT}."
            )

    def gradient(
        self, backend: Backend, lookups: LookupGradients | None, average_over_ranks: bool, within: SavedRows | None
    ) -> Gradient:
        """The gradient and the rows it lives on; raises before anything is modified.

        ``lookups`` (ids, dL/de of each lookup of this table) replaces ``.grad``: the table's
        gradient from those lookups alone, summed per id (PGD's intermediate passes). ``within``, the
        rows of a PGD round in progress: the gradient is re-addressed to them.
        ``average_over_ranks``: ``.grad`` is this rank's own (a backward under DDP's no_sync); the
        rows it needs are averaged over the DDP group here, U x d instead of the whole model.
        """
        self.check_trainable()
        dense = False
        if lookups is not None:
            if self.recorder is None:
                raise MissingGradientError(f"'{self.name}' is not an embedding table: it has no lookups.")
            grad_set, grad = gradient_rows(
                lookups,
                self.param.shape[0],
                self.recorder.padding_idx,
                True,
                backend,
                self.name,
                self.recorder.scale_grad_by_freq,
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
                grad_set = RowSet(grad.indices()[0], torch.arange(values.shape[0], device=values.device),
                                  rows_below=grad.shape[0], grad_rows_below=values.shape[0])  # fmt: skip
                grad = values.reshape(values.shape[0], -1)
            elif self.recorder is not None and not self.recorder.looked_up:
                raise MissingGradientError(
                    f"'{self.name}' has a gradient, but fastadv saw no lookup of it: no forward pass has looked it "
                    "up through its nn.Embedding module since fastadv was built. Create the fastadv object before "
                    "the forward pass whose gradient it uses, and look the table up through its module (not "
                    "inputs_embeds=F.embedding(ids, weight))."
                )
            elif self.recorder is not None and self.recorder.covers(self.param.grad):  # FSDP2: the DTensor itself
                ids = self.recorder.ids()
                if ids is None:
                    raise MissingGradientError(
                        f"'{self.name}' has a gradient, but fastadv saw no lookup of it since the gradient was "
                        "last reset. Create the fastadv object before the forward pass whose gradient it uses."
                    )
                grad_set, dense = row_set_from_ids(self._rows_of_this_rank(ids), grad.shape[0]), True
            else:
                grad = as_matrix(grad)
                all_rows = torch.arange(grad.shape[0], device=grad.device)
                grad_set = RowSet(all_rows, all_rows, rows_below=grad.shape[0], grad_rows_below=grad.shape[0])
                dense = True
        if average_over_ranks:
            if self.group is None or self.shard is not None or not dense:
                raise ValueError(
                    f"averaging '{self.name}''s gradient rows over ranks needs a table replicated by DDP (pass the "
                    "DDP-wrapped model), with a dense gradient."
                )
            world = torch.distributed.get_world_size(self.group)
            grad = all_reduce_sum(grad.index_select(0, grad_set.grad_rows), self.group).div_(world)
            grad_set, dense = grad_set.as_slots(), False
        if within is not None:  # a PGD round: the gradient on the saved rows' slots
            saved = within.rows
            if dense:  # a dense gradient can be read at any row
                grad_set = RowSet(saved.rows, saved.rows, saved.first, rows_below=saved.rows_below,
                                  grad_rows_below=saved.rows_below)  # fmt: skip
            else:
                grad, grad_set = gather_rows(grad, grad_set, saved.rows), saved.as_slots()
        # Under FSDP2 the norm's other terms are the other shards'.
        return Gradient(grad, grad_set, None if self.shard is None else self.shard.group)

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
        self, lookups: LookupGradients, grad: torch.Tensor, grad_set: RowSet
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
        kept = int(keep.sum())
        local = RowSet(rows.rows[keep] - start, torch.arange(kept, device=keep.device), first,
                       rows_below=self.shard.rows, grad_rows_below=kept)  # fmt: skip
        return summed[keep], local

    def _weight(self) -> torch.Tensor:
        """The table as a [rows, columns] matrix sharing the parameter's storage (this rank's shard under FSDP2)."""
        return as_matrix(self.param.data.to_local() if self.shard is not None else self.param.data)

    def add(self, gradient: Gradient, step: Step, sign: bool, backend: Backend) -> SavedRows:
        """FGM: save the rows, then add the perturbation to them in place (unless ``ok`` is False)."""
        backup = rows_backup_add(
            self._weight(), gradient.values, gradient.rows, step.norm, step.ok, step.size, sign, backend
        )
        _perturbations_in_force(self.param).append(backup)
        return SavedRows(gradient.rows, backup, backend, self.param._version)

    def ascend(
        self, gradient: Gradient, step: Step, radius: float, backend: Backend, previous: SavedRows | None
    ) -> SavedRows:
        """PGD: one step of ``size * g / norm`` on the rows, projected into the ``radius`` ball around
        the rows saved at the round's first step (``previous`` None: this call is that step, and saves them)."""
        backup = None if previous is None else previous.backup
        backup = rows_pgd_step(
            self._weight(), gradient.values, gradient.rows, backup, step.norm, step.ok, step.size, radius, backend
        )
        if previous is None:
            _perturbations_in_force(self.param).append(backup)
        return SavedRows(gradient.rows if previous is None else previous.rows, backup, backend, self.param._version)

    def clean_value(self, saved: SavedRows) -> torch.Tensor:
        """The parameter as it was before the perturbation, as a new tensor (V x d): what a checkpoint taken
        while perturbed must hold."""
        clean = self.param.detach().clone()
        local = clean.to_local() if self.shard is not None else clean
        matrix = as_matrix(local)
        rows_restore(matrix, saved.backup.to(matrix.dtype), saved.rows, saved.backend)
        return clean

    def check_restorable(self, saved: SavedRows) -> None:
        """Refuse to restore ``saved`` while a perturbation made after it is still in force on the table."""
        in_force = _in_force.get(id(self.param), [])
        mine = [i for i, backup in enumerate(in_force) if backup is saved.backup]
        if mine and mine[0] != len(in_force) - 1:
            raise AttackStateError(
                f"{self.name}: another attack perturbed these rows after this one and has not been restored; "
                "restoring this one first would leave the rows it saved, already perturbed, to be written back. "
                "Restore in the reverse order of the attacks (the last attack's restore() first); nothing was "
                "restored."
            )

    def restore(self, saved: SavedRows) -> None:
        """Copy the saved rows back into the parameter's own storage, bit for bit.

        Should the model have been converted since the attack (``model.half()``, ``.double()``), the saved rows
        are converted as the conversion converted the other rows."""
        weight = self._weight()
        written = self.param._version != saved.version  # fastadv writes through .data: the counter misses it
        rows_restore(weight, saved.backup.to(weight.dtype), saved.rows, saved.backend)
        in_force = _in_force.get(id(self.param), [])
        for i in reversed(range(len(in_force))):
            if in_force[i] is saved.backup:
                del in_force[i]
                break
        if written:  # after the rows are back, so that warnings as errors leave nothing perturbed
            warnings.warn(
                f"{self.name} was written between the attack and restore() (an optimizer.step() or another in-place "
                "update): restore() puts the batch's rows back as they were before the attack, so that update is "
                "lost on those rows. Step the optimizer after restore().",
                FastAdvWarning,
                stacklevel=4,
            )


@dataclass(frozen=True)
class SavedRows:
    """A weight perturbation's handle: the rows written and their clean values, [U, d]."""

    rows: RowSet
    backup: torch.Tensor
    backend: Backend
    version: int  # the parameter's version counter after the perturbation: a later write moves it

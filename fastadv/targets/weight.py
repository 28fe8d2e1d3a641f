"""Weight mode: a parameter perturbed in place, an embedding table on its recorded rows, any other one whole."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_reduce_sum, average_rows_over_ranks, gather_ids, row_shard
from ..errors import FrozenEmbeddingError, MissingGradientError
from ..ops import RowSet, gather_rows, row_set_from_ids, rows_backup_add, rows_l2_norm, rows_pgd_step, rows_restore
from ..ops.backend import Backend
from .gradients import Lookups, gradient_rows
from .recorder import LookupRecorder
from .tables import as_matrix

OUTPUT_MODE_HINT = "perturb the embedding's output instead of its weight with target='output' (or 'auto')"


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
                grad = as_matrix(grad)
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
        return as_matrix(self.param.data.to_local() if self.shard is not None else self.param.data)

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

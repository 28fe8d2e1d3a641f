"""Which rows of a table can hold a gradient: the token ids of its lookups since the gradient was reset."""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from ..errors import FastAdvWarning
from ..ops import RowSet, row_set_from_ids, rows_l2_norm
from ..ops.backend import resolve_backend
from .hook import subscribe
from .tables import as_matrix, table_rows, tied_names

_ENGINE = torch.autograd.Variable._execution_engine  # queue_callback: run fn at the end of this backward


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
        # .grad holds rows no recorded lookup gave it (fastadv built between two accumulated micro-batches), until
        # the gradient is next set to None.
        self._unrecorded = False
        self._warned_unrecorded = False
        # Whether .grad holds rows no lookup gave it, in a backward that recorded every lookup: the table is
        # used outside its modules (a head tied by hand, a penalty on the weight). Checked once, over the
        # whole table, at the end of the first such backward; on CUDA read once an event says it is computed.
        self.outside_lookups = False
        # "pending"; (the answer in pinned host memory, the event after which it may be read) while CUDA computes
        # it; None once read, or where it cannot be told (a tied projection, a lookup module of its own forward).
        self._outside_check: str | tuple[torch.Tensor, torch.cuda.Event] | None = "pending"
        self._warned_outside = False
        self.compact_at = self.COMPACT_FLOOR + 4 * table_rows(weight)
        self.padding_idx: int | None = None  # of the modules looking it up (they agree in practice)
        self.scale_grad_by_freq = False  # likewise
        self._handles: list = []
        self.looked_up = False  # whether any forward pass has looked the table up

    def attach(self, module: nn.Module) -> None:
        """Record the lookups of ``module`` (an nn.Embedding whose weight is ``self.weight``)."""
        if self.padding_idx is None:
            self.padding_idx = module.padding_idx
        self.scale_grad_by_freq = self.scale_grad_by_freq or module.scale_grad_by_freq
        if type(module).forward is not nn.Embedding.forward:  # its input may not be the rows (BART's positions)
            self._outside_check = None
        self._handles.append(subscribe(module, self._on_lookup))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_lookup(self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor) -> None:
        self.looked_up = True
        if not (torch.is_grad_enabled() and self.weight.requires_grad and isinstance(output, torch.Tensor)):
            return
        ids = ids.detach()
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
        _ENGINE.queue_callback(lambda: _ENGINE.queue_callback(self._after_backward))

    def _after_backward(self) -> None:
        self._remember_gradient()
        if self._outside_check == "pending":
            self._check_outside_lookups()

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
            self._unrecorded = False
        else:
            changed = seen is None or seen() is not grad or grad._version != version
            self._unrecorded = self._unrecorded or not self._gradient_is_recorded(grad)
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
        rows = row_set_from_ids(ids, table_rows(self.weight))
        alive = rows_l2_norm(as_matrix(grad), rows, resolve_backend(grad.device)) != 0
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

    def _check_outside_lookups(self) -> None:
        """Whether ``.grad`` has a non-zero row (or NaN/Inf) outside the recorded ids: one pass over the whole
        table, once, without a host sync on CUDA. Not where the recorded ids cannot be all of the rows' sources
        (.grad held rows before this recorder's first backward) or cannot be told from other ranks' (DDP, FSDP2)."""
        grad = self.weight.grad
        if self._unrecorded or grad is None or grad.is_sparse or type(grad).__name__ == "DTensor" or _several_ranks():
            return
        ids = self.ids()
        if ids is None:
            return
        rows = as_matrix(grad.detach())
        outside = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        outside[ids.to(device=rows.device, dtype=torch.int64)] = False
        # The largest |value| per row: a reduction, no V x d temporary.
        largest = torch.linalg.vector_norm(rows, float("inf"), dim=1)
        found = torch.where(outside, largest, torch.zeros((), dtype=largest.dtype, device=largest.device)).amax() != 0
        if not grad.is_cuda:
            self._outside_check, self.outside_lookups = None, bool(found)
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(found, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._outside_check = (host, ready)

    def _collect_outside_check(self) -> None:
        check = self._outside_check
        if isinstance(check, tuple) and check[1].query():
            self._outside_check, self.outside_lookups = None, bool(check[0])

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

    def _gradient_is_recorded(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is the tensor the last recorded backward left (perhaps modified in place since)."""
        seen = self._seen[0]
        return grad.is_sparse or type(grad).__name__ == "DTensor" or (seen is not None and seen() is grad)

    def covers(self, grad: torch.Tensor) -> bool:
        """Whether the recorded ids hold every row of ``grad`` (the table's ``.grad``) that can be non-zero.

        Not when a backward whose lookup bypassed the module (``inputs_embeds=F.embedding(ids, weight)``)
        made ``grad``, nor when ``grad`` held rows before this recorder saw its first backward; either way
        once, a warning says so."""
        self._collect_outside_check()
        if self.outside_lookups:
            if not self._warned_outside:
                self._warned_outside = True
                warnings.warn(
                    "The embedding's gradient comes not only from its lookups: rows no lookup gave held a gradient "
                    "at the end of a backward that recorded every lookup, so the model uses the table outside its "
                    "nn.Embedding modules (a head tied by hand, F.linear(h, embedding.weight), or a penalty on the "
                    "weight in the loss). Attacks on the weight read every row of the table: the snippet's "
                    "numbers, at the snippet's cost. To perturb only the lookups, pass target='output'.",
                    FastAdvWarning,
                    stacklevel=2,
                )
            return False
        if not self._unrecorded and self._gradient_is_recorded(grad):
            return True
        if not self._warned_unrecorded:
            self._warned_unrecorded = True
            warnings.warn(
                "The embedding's gradient holds rows that no lookup fastadv watched gave it: a lookup bypassed "
                "the nn.Embedding module (e.g. inputs_embeds=F.embedding(ids, weight)), or fastadv was built "
                "between two accumulated micro-batches. Until the gradient is next set to None (zero_grad()), "
                "attacks read every row of the table: the snippet's numbers, at the snippet's cost. Look the table "
                "up through its module, and build fastadv before the first micro-batch of a step.",
                FastAdvWarning,
                stacklevel=2,
            )
        return False

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
        self._remember_gradient()  # the gradient put back is one a recorded backward made

    @property
    def count(self) -> int:
        """How many ids the record holds (duplicates included, those being checked too): what attack() sorts."""
        return self._count

    def row_set(self) -> RowSet | None:
        """The recorded rows (None when nothing was recorded since the last reset)."""
        ids = self.ids()
        return None if ids is None else row_set_from_ids(ids, table_rows(self.weight))


def _several_ranks() -> bool:
    """Whether this process is one of several ranks (a gradient averaged over them holds other ranks' rows)."""
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


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
            if tied_names(model, weight):  # a tied projection's rows are expected: the tied warning covers them
                recorder._outside_check = None
        recorder.attach(module)
    return recorders

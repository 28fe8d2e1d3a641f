"""Data-parallel training: which ranks share a gradient, and the two collectives attack() needs.

Under DDP every rank holds the whole table and, after backward, the gradient averaged over all
ranks' batches: its non-zero rows are the union of every rank's token ids, so the ids are
gathered. Under FSDP2 (``fully_shard``) the table and its averaged gradient are sharded by rows
(a DTensor, Shard(0)): each rank perturbs the gathered ids that fall in its shard, and one
all-reduce of the sum of squares gives the global norm. A single-process run imports nothing
here beyond what ``import torch`` loads, and pays one class-attribute read per lookup.

Which DDP wrapper a model runs under is learnt from the model given to fastadv (the wrapper or a
model holding one), from ``bind_data_parallel``, or else from the forward pass itself: the
embedding hooks call :func:`data_parallel_forward` on every lookup, so the order in which the
adversary and the wrapper are built does not matter (``FGM(model)`` then ``DDP(model)``, or
``FGM(ddp_model.module)``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel  # loaded by `import torch` already

from .errors import FastAdvWarning

# DDP sets this private class attribute (TorchDynamo's DDPOptimizer reads it) to itself around its
# wrapped module's forward, `no_sync()` included: earlier releases reset it to None afterwards,
# 2.13 restores the outer wrapper's (nested DDP). Not set when DDP runs its Python reducer (compiled
# autograd) or delays every all-reduce; a torch without it leaves the warning at the first attack.
_ACTIVE_DDP = "_active_ddp_module"
DDP_FORWARD_VISIBLE = hasattr(DistributedDataParallel, _ACTIVE_DDP)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def process_group_initialized() -> bool:
    """torch.distributed is running: a DDP wrapper may exist, though fastadv has not seen it yet."""
    return _distributed()


def data_parallel_forward() -> nn.Module | None:
    """The DistributedDataParallel wrapper whose forward is running now, else None.

    Called by the embedding hooks at every lookup: one class-attribute read, so a model outside DDP
    pays nothing measurable. None also where torch does not say (see ``DDP_FORWARD_VISIBLE``).
    """
    return getattr(DistributedDataParallel, _ACTIVE_DDP, None)


def data_parallel_wrapper(model: nn.Module) -> nn.Module | None:
    """The DistributedDataParallel wrapper of ``model`` (it, or a submodule), or None."""
    if not _distributed():
        return None
    for module in model.modules():
        if isinstance(module, DistributedDataParallel):
            return module
    return None


def unwrap_data_parallel(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, module) of the model inside a DDP wrapper, e.g. ("module.", bert); ("", model) otherwise."""
    if _distributed() and isinstance(model, DistributedDataParallel):
        return "module.", model.module
    return "", model


@dataclass(frozen=True)
class RowShard:
    """The rows of a table this rank holds under FSDP2: global rows [start, start + rows)."""

    group: object
    start: int
    rows: int


def row_shard(param: torch.Tensor) -> RowShard | None:
    """The row shard of an FSDP2 parameter (a DTensor sharded on dim 0 over a 1-D mesh), else None.

    Raises ValueError for a DTensor in another layout (replicated, sharded on columns, 2-D mesh).
    """
    if type(param).__name__ != "DTensor":
        return None
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(
            f"the table is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; fastadv perturbs the "
            "rows of tables sharded by rows over one mesh dimension (FSDP2's fully_shard)."
        )
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-param.shape[0] // world)  # torch.chunk's split, as fully_shard uses
    start = min(rank * chunk, param.shape[0])
    rows = max(0, min(chunk, param.shape[0] - start))
    local = param.to_local().shape[0]
    if local != rows:
        raise ValueError(
            f"rank {rank} holds {local} rows of a {param.shape[0]}-row table, expected {rows} from an even "
            "torch.chunk split: this sharding is not one fastadv knows."
        )
    return RowShard(mesh.get_group(), start, rows)


def data_parallel_group_of_shard(param: torch.Tensor) -> object | None:
    """The group of an FSDP2 parameter sharded by rows (its ranks train on different batches), else None."""
    try:
        shard = row_shard(param)
    except ValueError:
        return None
    return None if shard is None else shard.group


def gather_ids(ids: torch.Tensor, group: object) -> torch.Tensor:
    """Every rank's token ids, concatenated in rank order (1-D int64). Ranks may hold different counts.

    Two collectives: the counts (a host read: one small sync per attack on CUDA), then the ids.
    """
    import torch.distributed as dist

    ids = ids.reshape(-1).to(torch.int64)
    world = dist.get_world_size(group)
    count = torch.tensor([ids.numel()], device=ids.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), dtype=torch.int64, device=ids.device)
    padded[: ids.numel()] = ids
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def all_reduce_sum(t: torch.Tensor, group: object) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group``, in place; returns it."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class DataParallelBinding:
    """The one DistributedDataParallel wrapper an adversary works with, and its process group.

    Found in the model given to the adversary (it, or a submodule), bound later with :meth:`bind`
    (a Trainer or ``accelerator.prepare`` wraps after the adversary is built), or seen in a forward
    pass (a lookup inside a DDP forward names its wrapper, see :func:`data_parallel_forward`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.wrapper = data_parallel_wrapper(model)
        self._warned_unwrapped = False

    @property
    def group(self) -> object | None:
        """The wrapper's process group: the ranks whose gradients DDP averages (None without a wrapper)."""
        return None if self.wrapper is None else self.wrapper.process_group

    def bind(self, wrapper: nn.Module | None) -> bool:
        """Use ``wrapper`` from now on; True when it is another than the one bound (None changes nothing)."""
        if wrapper is None or wrapper is self.wrapper:
            return False
        self.wrapper = wrapper
        return True

    def no_sync(self) -> contextlib.AbstractContextManager:
        """The wrapper's ``no_sync()`` (no gradient all-reduce in the block); a no-op without a wrapper."""
        return contextlib.nullcontext() if self.wrapper is None else self.wrapper.no_sync()

    def warn_if_unwrapped(self, groups: list[object | None], stacklevel: int) -> None:
        """Warn once when ranks train together but neither this binding nor any of ``groups`` (an FSDP2
        table's own) says how they share gradients: each rank would perturb its own batch's rows only."""
        if self._warned_unwrapped or any(g is not None for g in [self.group, *groups]):
            return
        if not _distributed() or torch.distributed.get_world_size() == 1:
            return
        self._warned_unwrapped = True
        how = (
            "no embedding lookup ran inside a DistributedDataParallel forward so far"
            if DDP_FORWARD_VISIBLE
            else f"this torch ({torch.__version__}) does not say which DistributedDataParallel forward is running "
            f"(DistributedDataParallel.{_ACTIVE_DDP} is gone), so fastadv cannot find the wrapper by itself"
        )
        warnings.warn(
            "torch.distributed runs several ranks, but fastadv knows of no DistributedDataParallel wrapper: the model "
            f"given to it is not one, and {how}. Each rank perturbs the rows of its own batch only. If gradients are "
            "averaged across ranks, build the adversary on the DDP-wrapped model, or call "
            "bind_data_parallel(ddp_model), so the rows of every rank's batch are perturbed.",
            FastAdvWarning,
            stacklevel=stacklevel + 1,
        )


def average_rows_over_ranks(
    ids: torch.Tensor, num_rows: int, grad: torch.Tensor, grad_set: object, group: object
) -> tuple[torch.Tensor, object]:
    """This rank's per-id gradient rows averaged over ``group``, on the rows of every rank's ids.

    Args:
        ids: this rank's token ids (any shape), each below ``num_rows`` (the table's rows);
        grad: [N, d] addressed by ``grad_set`` (a RowSet).

    Returns:
        (rows [M, d], RowSet of M slots): the same row set on every rank, M <= min(all ranks' ids, V),
        the rows summed over the ranks and divided by their number (each rank's gradient is of its
        own mean loss).
    """
    from .ops import gather_rows, row_set_from_ids

    # The same row set on every rank, so the all-reduce lines up.
    rows = row_set_from_ids(gather_ids(ids, group), num_rows).as_slots()
    world = torch.distributed.get_world_size(group)
    return all_reduce_sum(gather_rows(grad, grad_set, rows.rows), group).div_(world), rows

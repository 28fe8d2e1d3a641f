"""Data-parallel training: which ranks share a gradient, and the two collectives attack() needs.

Under DDP every rank holds the whole table and, after backward, the gradient averaged over all
ranks' batches: its non-zero rows are the union of every rank's token ids, so the ids are
gathered. Under FSDP2 (``fully_shard``) the table and its averaged gradient are sharded by rows
(a DTensor, Shard(0)): each rank perturbs the gathered ids that fall in its shard, and one
all-reduce of the sum of squares gives the global norm. A single-process run imports nothing
here beyond what ``import torch`` loads, and pays one class-attribute read per lookup.

A DeepSpeed engine (``deepspeed.initialize``'s, ZeRO stages 0-3) is a data-parallel wrapper too: its
ranks average their gradients over its data-parallel group, but the gradient lives in ZeRO's buffers
(``param.grad`` is None after backward), so fastadv perturbs the lookups' outputs there, and every pass of
a step but the last runs as a non-boundary backward (:meth:`DataParallelBinding.accumulate_only`), so the
engine reduces the gradients once. It is learnt from the model given or ``bind_data_parallel(engine)``,
not from the forward pass. Nothing imports deepspeed.

Which DDP wrapper a model runs under is learnt from the model given to fastadv (the wrapper or a
model holding one), from ``bind_data_parallel``, or else from the forward pass itself: the
embedding hooks call :func:`data_parallel_forward` on every lookup, so the order in which the
adversary and the wrapper are built does not matter (``FGM(model)`` then ``DDP(model)``, or
``FGM(ddp_model.module)``).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel  # loaded by `import torch` already

from .errors import FastAdvError, FastAdvWarning

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


def is_deepspeed_engine(module: object) -> bool:
    """``module`` is a DeepSpeed engine (``deepspeed.initialize``'s); never imports deepspeed."""
    deepspeed = sys.modules.get("deepspeed")
    engine = getattr(deepspeed, "DeepSpeedEngine", None)
    return engine is not None and isinstance(module, engine)


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, DistributedDataParallel) or is_deepspeed_engine(module)


def data_parallel_wrapper(model: nn.Module) -> nn.Module | None:
    """The DistributedDataParallel wrapper or DeepSpeed engine of ``model`` (it, or a submodule), or None."""
    if not _distributed():
        return None
    for module in model.modules():
        if _is_wrapper(module):
            return module
    return None


def wrapper_group(wrapper: nn.Module) -> object:
    """The process group whose ranks average their gradients: DDP's, or a DeepSpeed engine's data-parallel
    group (with sequence parallelism, the sequence-data-parallel one ZeRO reduces over)."""
    if is_deepspeed_engine(wrapper):
        return getattr(wrapper, "seq_data_parallel_group", None) or wrapper.data_parallel_group
    return wrapper.process_group


def unwrap_data_parallel(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, module) of the model inside a DDP wrapper or DeepSpeed engine, e.g. ("module.", bert); ("", model)
    otherwise."""
    if _distributed() and _is_wrapper(model):
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
        """The wrapper's process group: the ranks whose gradients it averages (None without a wrapper)."""
        return None if self.wrapper is None else wrapper_group(self.wrapper)

    @property
    def deepspeed(self) -> bool:
        """The wrapper is a DeepSpeed engine."""
        return self.wrapper is not None and is_deepspeed_engine(self.wrapper)

    @property
    def weight_rows_refusal(self) -> str | None:
        """Why the wrapper rules weight-row perturbation out (None where it does not)."""
        if not self.deepspeed:
            return None
        return (
            "DeepSpeed keeps its gradient in the engine's own buffers (param.grad is None after backward; ZeRO-3 "
            "also partitions the weight)"
        )

    def bind(self, wrapper: nn.Module | None) -> bool:
        """Use ``wrapper`` from now on; True when it is another than the one bound (None changes nothing)."""
        if wrapper is None or wrapper is self.wrapper:
            return False
        self.wrapper = wrapper
        return True

    def no_sync(self) -> contextlib.AbstractContextManager:
        """No gradient reduction in the block: DDP's ``no_sync()``, a DeepSpeed engine's non-boundary backward
        (:meth:`accumulate_only`); a no-op without a wrapper."""
        if self.wrapper is None:
            return contextlib.nullcontext()
        return self.accumulate_only() if self.deepspeed else self.wrapper.no_sync()

    def accumulate_only(self) -> contextlib.AbstractContextManager:
        """The passes of a step before its last: under a DeepSpeed engine, each backward in the block is off the
        accumulation boundary (the engine adds it to its gradient, reduces nothing and does not step), and an
        engine step inside it is an error; elsewhere a no-op (DDP all-reduces every pass unless asked not to)."""
        return _off_the_boundary(self.wrapper) if self.deepspeed else contextlib.nullcontext()

    def output_gradient_pass(self) -> contextlib.AbstractContextManager:
        """A forward pass, and a ``torch.autograd.grad`` of dL/de alone (no parameter gradient), in the block:
        DDP's ``no_sync()`` (the forward must not arm the all-reduce); under a DeepSpeed engine, the hooks the
        engine puts on the forward's outputs neither start a backward of its own (ZeRO would reduce gradients
        that no pass made) nor divide dL/d(output) by the accumulation steps; a no-op without a wrapper."""
        return _outside_engine_backward(self.wrapper) if self.deepspeed else self.no_sync()

    def check_knows_engine(self, params: list[torch.Tensor], what: str) -> None:
        """Raise when ``params`` are trained by a DeepSpeed engine this binding was not given: fastadv would run
        every pass as the accumulation boundary and read no gradient (ZeRO keeps it in its own buffers)."""
        if self.deepspeed or "deepspeed" not in sys.modules:
            return
        # ZeRO-3 partitions every parameter (ds_id); ZeRO-1/2 mark each one they optimize (grad_accum).
        if any(hasattr(p, "ds_id") or hasattr(p, "grad_accum") for p in params):
            raise FastAdvError(
                f"{what} is trained by a DeepSpeed engine that fastadv was not given, so it cannot run the passes of a "
                "step before one engine step. Build the adversary on the engine (FGM(engine), with engine from "
                "deepspeed.initialize), or call adversary.bind_data_parallel(engine) before training."
            )

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
            "torch.distributed runs several ranks, but fastadv knows of no DistributedDataParallel wrapper or "
            f"DeepSpeed engine: the model given to it is not one, and {how}. Each rank perturbs the rows of its own "
            "batch only. If gradients are "
            "averaged across ranks, build the adversary on the DDP-wrapped model (or the DeepSpeed engine), or call "
            "bind_data_parallel(ddp_model or engine), so the rows of every rank's batch are perturbed.",
            FastAdvWarning,
            stacklevel=stacklevel + 1,
        )


@contextlib.contextmanager
def _off_the_boundary(engine: nn.Module) -> Iterator[None]:
    """``engine``'s backwards in the block are not its accumulation boundary; its own boundary state after."""
    if not engine.managed_gradient_accumulation():  # the engine reduces in step() only: every backward accumulates
        yield
        return
    # The engine's own state: None (its micro-step counter decides) or what set_gradient_accumulation_boundary set,
    # e.g. accelerate's sync_gradients. Each backward hands the engine's state to the ZeRO optimizer.
    saved, steps = engine._is_gradient_accumulation_boundary, engine.global_steps
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine._is_gradient_accumulation_boundary = saved
    if engine.global_steps != steps:
        raise FastAdvError(
            "the DeepSpeed engine took an optimizer step between the adversary's passes (accelerate's "
            "accelerator.backward calls engine.step() at the accumulation boundary), so the weights moved under the "
            "attack. Pass backward=engine.backward (the engine from deepspeed.initialize, or "
            "accelerator.deepspeed_engine_wrapped.engine) and call engine.step() after adversary.step()."
        )


@contextlib.contextmanager
def _outside_engine_backward(engine: nn.Module) -> Iterator[None]:
    """The engine's forward hooks its outputs: the first backward through them calls ``engine._backward_prologue``
    (which queues ZeRO's reduction for the end of that backward) and each output's gradient goes through the
    ``engine._backward_prologue_per_tensor`` the forward found (a division by the accumulation steps). Instance
    attributes shadow both for the block, forward included."""
    engine._backward_prologue = _no_prologue
    engine._backward_prologue_per_tensor = _unchanged
    try:
        yield
    finally:
        del engine._backward_prologue, engine._backward_prologue_per_tensor


def _no_prologue() -> None:
    pass


def _unchanged(grad: torch.Tensor | None) -> torch.Tensor | None:
    return grad


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

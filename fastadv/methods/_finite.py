"""The one NaN rule of every method: a step whose passes fastadv adds end with a non-finite loss or gradient
gives ``.grad`` nothing, and is counted; nothing waits for the host.

While a :class:`FiniteGuard` is armed (from the attack to the restore, or around a method's ``step()``), the
losses fastadv holds are noted, and when it is disarmed one check runs over every parameter's ``.grad``:
torch's multi-tensor non-finite check (``torch._amp_foreach_non_finite_check_and_unscale_``, GradScaler's, one
op per dtype). If a loss or a gradient is not finite, every ``.grad`` is set to zeros on the device (one
multi-tensor op) and the step is counted once in ``skipped_steps``: the optimizer step that follows moves
nothing but what its state carries (Adam's moments, weight decay), as a step GradScaler skips in fp16 moves
nothing, and no NaN or Inf reaches the weights.

Why after the passes and not per gradient: the rule before this one masked each gradient as autograd added
it, in a pre-hook on every parameter's AccumulateGrad node. That kept the clean pass's gradient, but cost
about 17 dispatched ops per parameter per pass (on a GPU, a kernel launch each: 3,400 launches a step on a
BERT-base, more than the whole step's compute on a small model), plus registering 200 hooks a step. Keeping
the clean gradient at a constant cost would need a second copy of every gradient (the clean one, set aside
during the added passes), which costs the model's size in memory; no op adds a gradient "only if finite"
in place once a NaN is in it. So the step is dropped whole instead, on the device, at the cost of two
passes over the gradients that the old rule also made (a read, and a write), in a constant number of ops.
In fp32 and bf16 a non-finite adversarial pass after a finite clean one is rare (a huge epsilon, an
overflowing model); the clean pass's own non-finite gradient, which the old rule left in ``.grad``, is now
zeroed too.

In fp16 (a forward under fp16 autocast, or an fp16 table) an overflow is the loss scaler's signal to lower
its scale (torch's GradScaler, DeepSpeed's dynamic loss scale): there the gradients are left for the scaler,
which skips the optimizer step, so nothing of the pass reaches the weights either; the step is still counted.
Zeroing them would hide every overflow from the scaler, whose scale would then never come down.

Under torch.distributed the choice to zero rests on the gradients alone, which DDP has averaged over the
ranks by then, so that every rank makes the same one; a rank's own non-finite loss is counted there.

Gradients that are not plain tensors in ``.grad`` are not zeroed: FSDP2's sharded DTensor gradients (each
rank would decide on its own shard) and DeepSpeed's partitions (ZeRO-2 and 3 move them out of ``.grad``
during the backward); there a step is counted when a loss fastadv holds is not finite.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict

import torch
from torch import nn

from ..distributed import process_group_initialized
from ..targets.hook import InertHook
from ..targets.structure import structure_version
from ._common import SkipCounter

# The integer type of each float width: zeroing through it multiplies bit patterns, so that 0 clears a NaN
# (a float NaN * 0 stays NaN) and 1 keeps every bit.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FiniteGuard:
    """Drops the gradients of a step whose added passes had a non-finite loss or gradient, and counts it in
    ``counter``.

    Args:
        model: the model whose parameters' gradients are guarded.
        counter: the method's count of skipped steps; a step dropped here is merged into the step counted
            last (a step whose attack was already skipped is not counted twice).
    """

    def __init__(self, model: nn.Module, counter: SkipCounter) -> None:
        self._model = weakref.ref(model)
        self._counter = counter
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._lost: torch.Tensor | None = None  # bool, 0-dim: a loss since armed was not finite
        self._lost_on_host = False  # the same, for the losses on the CPU (read there: no device to wait for)
        self._fp16 = False  # a lookup since armed ran in fp16: the loss scaler sees the overflows
        self._armed = False
        self._zero3 = False  # the model's parameters are DeepSpeed ZeRO-3 partitions (ds_id)
        self._version = -1  # the structure version the lists below were read at
        self._parameters: list[nn.Parameter] = []
        self._embeddings: list[nn.Embedding] = []
        # By device: the check's two 0-dim fp32 buffers, (the inverse scale 1 it multiplies by, found_inf).
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def armed(self) -> bool:
        return self._armed

    def arm(self, loss: torch.Tensor | None = None) -> None:
        """Guard the passes until :meth:`disarm`; ``loss``, if given, is theirs (see :meth:`loss`)."""
        if not self._armed:
            self._armed, self._lost, self._lost_on_host, self._fp16 = True, None, False, False
            self._read_model()
            # ZeRO-3 adds its partitions' gradients itself (nothing in .grad to check), and a module hook added
            # between its steps breaks its trace of the module order: there the steps are counted by their loss.
            self._zero3 = bool(self._parameters) and hasattr(self._parameters[0], "ds_id")
            if not self._zero3:
                watch = PrecisionWatch(self)
                self._handles = [m.register_forward_hook(watch, with_kwargs=True) for m in self._embeddings]
        self.loss(loss)

    def loss(self, loss: torch.Tensor | None) -> None:
        """A loss of the guarded passes: not finite, the step gives ``.grad`` nothing."""
        if loss is None:
            return
        loss = loss.detach()
        if reads_on_host(loss.device) and loss.numel() == 1:  # no device to wait for: read it
            self._lost_on_host = self._lost_on_host or not math.isfinite(loss.item())
        else:
            self._record(~torch.isfinite(loss).all())

    def disarm(self) -> None:
        """Stop guarding: check every gradient once, drop them all if anything since :meth:`arm` was not finite,
        and count the step once if so."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self._armed:
            return
        self._armed = False
        grads = [] if self._zero3 else _plain_gradients(self._parameters)
        found = _any_non_finite(grads, self._buffers) if grads else None
        loss_lost, self._lost = self._lost, None
        if self._lost_on_host:
            loss_lost, self._lost_on_host = torch.ones((), dtype=torch.bool), False
        if found is not None and reads_on_host(found.device) and loss_lost is None and not found.item():
            return  # the CPU's common case, read on the host: nothing more to run
        if found is None and loss_lost is None:
            return
        lost = found if loss_lost is None else loss_lost if found is None else found | loss_lost.to(found.device)
        if grads and not self._fp16:  # fp16: the scaler's to see (see the module docstring)
            # Across processes the gradients are the ranks' average by now and a loss is one rank's own: zeroing
            # on the gradients alone keeps every rank's choice the same (a non-finite loss gives non-finite
            # gradients, but for a saturated one, which leaves them finite and the weights safe).
            zero_if(grads, found if process_group_initialized() else lost)
        self._counter.merge_into_last(lost)

    def _read_model(self) -> None:
        """The model's parameters and embeddings, read again only when a module changed since the last read."""
        version = structure_version()
        model = self._model()
        if version == self._version or model is None:
            return
        self._parameters = list(model.parameters())
        self._embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        self._version = version

    def _record(self, lost: torch.Tensor) -> None:
        self._lost = lost if self._lost is None else self._lost | lost.to(self._lost.device, non_blocking=True)


class PrecisionWatch:
    """The forward hook on the embeddings while a guard is armed: notes a lookup in fp16 (autocast or table).
    Holds the guard weakly; a copied model (deepcopy, pickle) holds an inert hook."""

    def __init__(self, guard: FiniteGuard) -> None:
        self._guard = weakref.ref(guard)

    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple:
        return (InertHook, ())

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        guard = self._guard()
        if guard is None or guard._fp16:
            return
        device = module.weight.device.type
        autocast_fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        guard._fp16 = autocast_fp16 or module.weight.dtype == torch.float16


def reads_on_host(device: torch.device) -> bool:
    """Whether the guard reads its flags on the host: on the CPU, where there is no device to wait for. (The
    sync tests make it False on the CPU too, so that a CPU run takes, and proves sync-free, the CUDA path.)"""
    return device.type == "cpu"


def _plain_gradients(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients autograd adds into ``.grad`` as plain tensors (a sparse gradient's values): none of a
    parameter without one, nor FSDP2's DTensor shards. The fast path reads each ``.grad`` once."""
    grads = [g for p in params if (g := p.grad) is not None]
    if all(type(g) is torch.Tensor and not g.is_sparse for g in grads):
        return grads
    return [g._values() if g.is_sparse else g for g in grads if type(g) is torch.Tensor]


def _any_non_finite(
    grads: list[torch.Tensor], buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """bool, 0-dim, on the first gradient's device: some element of ``grads`` is NaN or Inf. One multi-tensor
    op per device and dtype (GradScaler's check, with an inverse scale of 1: the values are rewritten as they
    are); nothing read on the host. ``buffers`` (by device: the scale 1 and found_inf, made at the first call
    and reused) is the caller's."""
    # Grouped in C++ (the optimizers' grouping), not by a Python loop over the gradients: the host's work here
    # stays one call whatever the number of parameters.
    groups = torch._C._group_tensors_by_device_and_dtype([grads], False)
    first = grads[0].device
    found: dict[torch.device, torch.Tensor] = {}
    for (device, _), ((group,), _) in groups.items():
        if device not in buffers:
            buffers[device] = tuple(torch.full((), v, dtype=torch.float32, device=device) for v in (1, 0))
        one, found_inf = buffers[device]
        if device not in found:
            found[device] = found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, one)
    total = found.pop(first) > 0  # a new tensor: the buffer is zeroed again at the next check
    for other in found.values():
        total = total | (other > 0).to(total.device, non_blocking=True)
    return total


def zero_if(grads: list[torch.Tensor], condition: torch.Tensor, on_host: bool | None = None) -> None:
    """Set every element of ``grads`` to zero where ``condition`` (bool, 0-dim) is True, NaN and Inf included;
    leave them bit for bit otherwise.

    On the CPU the condition is read (no device to wait for) and nothing runs unless it holds. Elsewhere the
    choice is made on the device: each gradient, viewed as integers of its width, is multiplied by
    ``not condition`` (0 clears every bit, 1 keeps them), one multi-tensor op per width. ``on_host`` forces
    either way (tests)."""
    if not grads:
        return
    if reads_on_host(condition.device) if on_host is None else on_host:
        if bool(condition):
            torch._foreach_zero_(grads)
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        bits = _BITS[grad.element_size()]
        groups[grad.device, bits].append(grad.view(bits))
    keeps: dict[torch.device, torch.Tensor] = {}
    for (device, bits), group in groups.items():
        if device not in keeps:
            keeps[device] = (~condition).to(device, non_blocking=True)
        torch._foreach_mul_(group, keeps[device].to(bits))


def _finite(values: torch.Tensor) -> torch.Tensor:
    """bool, 0-dim: every element finite. One reduction and no temporary of the input's size: min and max
    are NaN if any element is, and +-Inf if any element is."""
    if values.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=values.device)
    low, high = torch.aminmax(values)
    return torch.isfinite(low) & torch.isfinite(high)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """bool, 0-dim, on the device: every element of every tensor (at least one) finite; no temporary of their
    size (see :func:`_finite`)."""
    ok = _finite(tensors[0])
    for tensor in tensors[1:]:
        ok = ok & _finite(tensor)
    return ok

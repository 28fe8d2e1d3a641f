"""The one NaN rule of every method: a pass fastadv adds whose loss or gradient is not finite gives ``.grad`` nothing.

While a :class:`FiniteGuard` is armed, each gradient a backward pass brings to a parameter passes a
pre-hook on the parameter's AccumulateGrad node (the node that adds it into ``.grad``, before DDP's
or DeepSpeed's reduction hooks see it): it is kept if it is finite, no gradient before it since the
guard was armed was not, and the pass's loss (where fastadv holds it: every ``step()``) is finite;
otherwise it is replaced by zeros. The test and the choice run on the device: nothing waits for the
host. A non-finite loss thus drops its pass whole. Where fastadv does not hold the loss (the user's
own backward between ``attack()`` and ``restore()``) a pass is dropped from its first non-finite
gradient on; a NaN loss makes the gradients nearest the loss non-finite, and they come first. What
was dropped is counted once. A sparse gradient (the batch's rows, see :mod:`fastadv.ops.lookup`)
is tested and masked on its rows alone.

In fp16 (a forward under fp16 autocast, or an fp16 table) an overflow is the loss scaler's signal to
lower its scale (torch's GradScaler, DeepSpeed's dynamic loss scale): there the gradients are left
for the scaler, which skips the optimizer step, so nothing of the pass reaches the weights either;
the pass is still counted. Masking them would hide every overflow of these passes from the scaler,
whose scale would then never come down.

Where a gradient is not added through a parameter's own AccumulateGrad (FSDP2's sharded DTensor
parameters, DeepSpeed ZeRO-3's partitions), it is not masked: the pass is still counted when its
loss is not finite.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..targets.hook import InertHook
from ._common import SkipCounter


class FiniteGuard:
    """Masks the non-finite gradients of the passes it is armed for, and counts those passes in ``counter``.

    Args:
        model: the model whose parameters' gradients are guarded.
        counter: the method's count of skipped steps; a pass masked here is merged into the step
            counted last (a step whose attack was already skipped is not counted twice).
    """

    def __init__(self, model: nn.Module, counter: SkipCounter) -> None:
        self._model = weakref.ref(model)
        self._counter = counter
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._nodes: list[object] = []  # the AccumulateGrad nodes, held so the backward uses the hooked ones
        self._loss_ok: torch.Tensor | None = None
        self._lost: torch.Tensor | None = None  # bool, 0-dim: anything masked since armed
        self._fp16 = False  # a lookup since armed ran in fp16: the loss scaler sees the overflows
        self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    def arm(self, loss: torch.Tensor | None = None) -> None:
        """Guard the backward passes until :meth:`disarm`; ``loss``, if given, is theirs (see :meth:`loss`)."""
        if not self._armed:
            self._armed, self._lost, self._fp16 = True, None, False
            model = self._model()
            # ZeRO-3 adds its partitions' gradients itself (nothing to mask), and a module hook added between its
            # steps breaks its trace of the module order: there the passes are only counted, by their loss.
            if model is not None and not any(hasattr(p, "ds_id") for p in model.parameters()):
                self._hook(model)
        self.loss(loss)

    def _hook(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if _guardable(p)]
        with torch.enable_grad():  # the view's grad_fn leads to the parameter's AccumulateGrad
            self._nodes = [p.view_as(p).grad_fn.next_functions[0][0] for p in params]
        self._handles = [node.register_prehook(self._mask) for node in self._nodes]
        watch = PrecisionWatch(self)
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        self._handles += [m.register_forward_hook(watch, with_kwargs=True) for m in embeddings]

    def loss(self, loss: torch.Tensor | None) -> None:
        """The loss the next backward passes take: not finite, every gradient of theirs is dropped."""
        if loss is None:
            self._loss_ok = None
            return
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok
        self._record(~ok)

    def disarm(self) -> None:
        """Stop guarding and count the passes since :meth:`arm` once if anything of them was dropped."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._nodes, self._loss_ok, self._armed = [], [], None, False
        if self._lost is not None:
            self._counter.merge_into_last(self._lost)
            self._lost = None

    def _record(self, lost: torch.Tensor) -> None:
        self._lost = lost if self._lost is None else self._lost | lost.to(self._lost.device, non_blocking=True)

    def _mask(self, grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        if grad is None:
            return grads
        values = grad._values() if grad.is_sparse else grad
        ok = _finite(values)
        if self._lost is not None:  # from the first non-finite gradient on, nothing more is kept
            ok = ok & ~self._lost.to(ok.device, non_blocking=True)
        if self._loss_ok is not None:
            ok = ok & self._loss_ok.to(ok.device, non_blocking=True)
        self._record(~ok)
        if self._fp16:  # the scaler's to see (see the module docstring)
            return grads
        # In place, no temporary of the gradient's size (a tied head's is V x d). The gradient may be one autograd
        # also hands to another input of the same node; it changes only when ``ok`` is False, and from then on
        # every gradient of the guarded passes is dropped anyway.
        values.masked_fill_(~ok, 0.0)
        return grads


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


def _guardable(param: torch.Tensor) -> bool:
    """A leaf parameter whose gradient autograd adds into ``.grad`` itself: not an FSDP2 shard (a DTensor), not
    a DeepSpeed ZeRO-3 partition (``ds_id``: ZeRO-3 swaps its storage and adds its gradients itself)."""
    plain = type(param) in (torch.Tensor, nn.Parameter) and not hasattr(param, "ds_id")
    return plain and param.requires_grad and param.is_leaf

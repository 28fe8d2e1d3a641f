"""What every method shares: argument checks, the closure's loss, the default backward."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import ReentrantCheckpointError

Closure = Callable[[], torch.Tensor]
BackwardFn = Callable[[torch.Tensor], object]


class Adversary(Protocol):
    """What the integrations drive: FGM, PGD, FreeLB, GradientPenalty, VAT, SMART and R3F.

    ``step(closure, backward=..., enabled=...)`` runs one training step's forward and backward passes
    (closure() returns the loss, or for VAT, SMART and R3F the model's output; ``backward``
    backpropagates one, default ``loss.backward()``) and returns the clean loss, detached; the optimizer
    step stays the caller's. ``enabled=False`` runs a plain step. ``model`` is the module it watches.
    """

    model: nn.Module

    def step(self, closure: Closure, backward: BackwardFn | None = None, *, enabled: bool = True) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_epsilon(value: float, name: str = "epsilon") -> float:
    """A finite, non-negative real number (a size such as epsilon or a step size: a Python or NumPy int or
    float), as a float."""
    if isinstance(value, (torch.Tensor, bool)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float (or a NumPy scalar), found {type(value).__name__}.")
    try:
        size = float(value)
    except OverflowError:  # an int past float's range (10**400)
        size = math.inf
    if not math.isfinite(size) or size < 0:
        shown = value if math.isfinite(size) or not isinstance(value, int) else f"an int of {len(str(value))} digits"
        raise ValueError(f"{name} must be finite and >= 0, found {shown}.")
    return size


def check_emb_name(value: object) -> str | None:
    """``emb_name`` as the methods take it: None (the input embedding) or one string, matched as a substring of
    the parameters' names."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(
        f"emb_name must be a string (a substring of the name of the parameter to perturb) or None (the input "
        f"embedding), found {type(value).__name__} {value!r}. To perturb several tables, pass a substring their "
        "names share, or build one adversary per table."
    )


def check_flag(value: object, name: str) -> bool:
    """A bool (Python's or NumPy's): a string such as 'no' is truthy, and would run the adversary."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, found {type(value).__name__} {value!r}.")


def check_loss(loss: object, where: str) -> torch.Tensor:
    """The closure's loss, or a clear error when it is not a scalar tensor that needs a gradient."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        found = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"{where} must return the loss as a scalar tensor, found {found}.")
    if not loss.requires_grad:
        raise RuntimeError(f"{where} returned a loss that does not require grad: run it with gradients enabled.")
    return loss


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def plain_step(closure: Closure, backward: BackwardFn) -> torch.Tensor:
    """What ``step(..., enabled=False)`` runs: one forward and one backward of the loss; the loss, detached."""
    loss = check_loss(closure(), "closure()")
    backward(loss)
    return loss.detach()


def output_gradients(
    loss: torch.Tensor, edges: list, method: str, alternative: str = "", create_graph: bool = False
) -> list[torch.Tensor | None]:
    """dL/de at each autograd edge of an embedding's output (None where ``loss`` does not reach it),
    through ``torch.autograd.grad``: no parameter gradient is computed or written.

    Reentrant activation checkpointing refuses ``torch.autograd.grad``; its error becomes
    :class:`ReentrantCheckpointError`, which says what to call instead (``alternative``: the
    method's own way around it, if it has one, as ", or ...").
    """
    if not edges:
        return []
    try:
        return list(torch.autograd.grad(loss, edges, create_graph=create_graph, allow_unused=True))
    except RuntimeError as err:
        if not _is_reentrant_refusal(err):
            raise
        raise ReentrantCheckpointError(
            f"{method} takes dL/de, the gradient of the loss with respect to the embedding's output, with "
            "torch.autograd.grad, and the model runs reentrant activation checkpointing (use_reentrant=True), "
            "which rebuilds the checkpointed layers' graph inside backward and so cannot give that gradient. "
            "Checkpoint with use_reentrant=False, torch's recommended mode: in Hugging Face TrainingArguments, "
            "gradient_checkpointing_kwargs={'use_reentrant': False}; in LLaMA-Factory's config, "
            "use_reentrant_gc: false; on a transformers model, "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
            "(recent transformers: activation_checkpointing_enable(), where it is the default); outside "
            f"transformers, torch.utils.checkpoint.checkpoint(..., use_reentrant=False){alternative}."
        ) from err


def _is_reentrant_refusal(err: RuntimeError) -> bool:
    # torch 2.2: "Checkpointing is not compatible with .grad() ..."; later: "When use_reentrant=True, ..."
    message = str(err)
    return ".grad()" in message and "checkpoint" in message.lower()


class OutputGradientPasses:
    """How one method takes dL/de in its passes that need no parameter gradient (pgd.step's inner passes, VAT's
    and SMART's ascent, the finite-difference penalty's first pass).

    ``torch.autograd.grad`` to the lookups alone, while it works. Reentrant activation checkpointing
    (LLaMA-Factory's default, ``use_reentrant=True``) refuses it: the first time, the pass is run again and
    taken with a plain ``backward()`` instead, and every later pass of this method too. That backward computes
    every parameter's gradient, which is set aside: each trainable parameter's ``.grad`` is detached before it
    and put back after, the pass's own dropped, so ``.grad`` ends as the pass found it. Its cost, paid only
    under reentrant checkpointing: the parameters' gradients of the pass (a full backward, not one to the
    lookups alone), and a transient ``.grad`` of every trainable parameter, the embedding table's dense V x d
    one included. Sharded parameters (FSDP2, DeepSpeed) have no such fallback: there the refusal is
    :class:`ReentrantCheckpointError`, which names the non-reentrant knobs.
    """

    def __init__(self, model: nn.Module, method: str, alternative: str = "") -> None:
        self._model = model
        self._method, self._alternative = method, alternative
        self.reentrant = False  # the model was found to refuse torch.autograd.grad

    def gradients(self, run: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]) -> list[torch.Tensor | None]:
        """dL/de at each tensor ``run()`` gives with its loss (one forward pass: ``(loss, tensors)``); None where
        the loss does not reach one. ``run`` may be called twice (the first time reentrant checkpointing refuses
        ``torch.autograd.grad``)."""
        if not self.reentrant:
            loss, tensors = run()
            try:
                return output_gradients(loss, tensors, self._method, self._alternative)
            except ReentrantCheckpointError:
                if self._trainable_parameters() is None:
                    raise
                self.reentrant = True
            del loss, tensors
        params = self._trainable_parameters()
        if params is None:  # sharded since: refuse as autograd.grad did
            return output_gradients(*run(), self._method, self._alternative)
        return backward_gradients(*run(), params)

    def _trainable_parameters(self) -> list[nn.Parameter] | None:
        """The parameters whose ``.grad`` the fallback sets aside; None if one is sharded (no fallback)."""
        params = [p for p in self._model.parameters() if p.requires_grad]
        if any(type(p) not in (nn.Parameter, torch.Tensor) or hasattr(p, "ds_id") for p in params):
            return None
        return params


def backward_gradients(loss: torch.Tensor, tensors: list, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """dL/d``tensors`` (tensors, or autograd ``GradientEdge`` s as :func:`output_gradients` takes them) by
    ``loss.backward()``, read by hooks, with ``params``' ``.grad`` as they were before it (the backward's own
    parameter gradients dropped); None for one the loss does not reach."""
    found: list[torch.Tensor | None] = [None] * len(tensors)

    def keep(index: int, grad: torch.Tensor | None) -> None:
        if grad is not None:
            found[index] = grad if found[index] is None else found[index] + grad

    handles, leaves = [], []
    for index, tensor in enumerate(tensors):
        if isinstance(tensor, torch.Tensor):
            if tensor.requires_grad:
                handles.append(tensor.register_hook(functools.partial(keep, index)))
                if tensor.is_leaf:
                    leaves.append((tensor, tensor.grad))
        else:  # a GradientEdge: the gradient its node receives for that output
            number = tensor.output_nr
            handles.append(tensor.node.register_prehook(lambda grads, i=index, n=number: keep(i, grads[n])))
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
        for leaf, grad in leaves:
            leaf.grad = grad
        for handle in handles:
            handle.remove()
    return found


class SkipCounter:
    """Steps skipped on the device (NaN/Inf gradients), counted without a host sync until read."""

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None
        self._last: torch.Tensor | None = None  # whether the step counted last was skipped

    def add(self, skipped: torch.Tensor) -> None:
        """Count ``skipped`` (a 0-dim bool tensor, on any device) as one step, without reading it."""
        self._count = skipped.long() if self._count is None else self._count + skipped.long()
        self._last = skipped

    def begin_step(self) -> None:
        """A new step begins: what :meth:`merge_into_last` brings next counts as a step of its own."""
        self._last = None

    def merge_into_last(self, skipped: torch.Tensor) -> None:
        """``skipped`` for the step counted last: counted only if that step was not (one step, one count)."""
        if self._last is None:
            self.add(skipped)
            return
        skipped = skipped.to(self._last.device, non_blocking=True)
        assert self._count is not None
        self._count = self._count + (skipped & ~self._last).long()
        self._last = self._last | skipped

    def __int__(self) -> int:
        return 0 if self._count is None else int(self._count)

    def set(self, count: int) -> None:
        """Start from ``count`` steps (a checkpoint's); nothing is counted as the last step."""
        self._count, self._last = torch.tensor(count, dtype=torch.long), None


class CarriedState:
    """What a method carries from one step to the next, for checkpoints: ``state_dict()`` and
    ``load_state_dict()``, as torch modules and optimizers have them. The Trainer mixin
    (``fastadv.integrations.hf``) saves it beside the optimizer's state and loads it on resume.

    Every method carries its count of skipped steps (``skipped_steps``); SMART with ``proximal_weight`` its
    momentum teacher too.
    """

    _skipped: SkipCounter
    _carried: tuple[str, ...] = ("skipped_steps",)  # the keys of state_dict()

    def state_dict(self) -> dict[str, Any]:
        """The method's carried state: ``{"skipped_steps": int}`` (SMART: and ``"teacher"``). Reading it syncs."""
        return {"skipped_steps": int(self._skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Carry on from ``state`` (what :meth:`state_dict` gave, e.g. from a checkpoint)."""
        expected = set(self._carried)
        if not isinstance(state, Mapping) or set(state) != expected:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"{type(self).__name__}.load_state_dict() takes what its state_dict() gives, the keys "
                f"{sorted(expected)}; found {found}."
            )
        count = state["skipped_steps"]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"skipped_steps must be an int >= 0, found {count!r}.")
        self._skipped.set(int(count))

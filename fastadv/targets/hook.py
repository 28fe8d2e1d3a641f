"""The one forward hook fastadv puts on an embedding module, shared by everything that watches it.

Recording the rows a batch touches, adding a delta to the output, keeping dL/de, FreeLB's delta:
each subscribes a function ``(module, ids, output) -> new output or None`` to the module's
:class:`LookupHook`, which reads the ids once per lookup and calls the subscribers in the order they
subscribed, each seeing the output the one before it returned. Before them all, while any fastadv
object asked for it, the lookup is remade so that its backward adds the table's gradient as rows
(see :mod:`fastadv.targets.row_gradients`). The hook runs before any hook of the user's on the same
module, so what fastadv records and adds belongs to the lookup itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..distributed import data_parallel_forward
from .row_gradients import remade_lookup

Subscriber = Callable[[nn.Module, object, torch.Tensor], "torch.Tensor | None"]


class LookupHook:
    """The forward hook of one module: the row-gradient remake (while wanted), then every subscriber."""

    def __init__(self, module: nn.Module) -> None:
        self._subscribers: dict[int, Subscriber] = {}  # by subscription number: insertion order is call order
        self._next = 0
        self.row_gradient_owners = 0  # fastadv objects that want the lookup's gradient added as rows
        self.data_parallel: nn.Module | None = None  # the DDP wrapper whose forward last ran a lookup
        self._handle = module.register_forward_hook(self, with_kwargs=True, prepend=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        ids = args[0] if args else kwargs.get("input")
        if (wrapper := data_parallel_forward()) is not None:  # frozen tables too: output mode needs the group
            self.data_parallel = wrapper
        result = None
        if self.row_gradient_owners:
            result = remade_lookup(module, ids, output)
            output = output if result is None else result
        for subscriber in list(self._subscribers.values()):
            replaced = subscriber(module, ids, output)
            if replaced is not None:
                output = result = replaced
        return result

    # A copy of the model (copy.deepcopy for an EMA or the best checkpoint, pickle, torch.save(model)) carries
    # an InertHook in this hook's place: no subscriber, no autograd state, nothing perturbed in the copy.
    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple:
        return (InertHook, ())

    def subscribe(self, subscriber: Subscriber) -> int:
        key, self._next = self._next, self._next + 1
        self._subscribers[key] = subscriber
        return key

    def unsubscribe(self, key: int) -> None:
        self._subscribers.pop(key, None)

    @property
    def idle(self) -> bool:
        return not self._subscribers and not self.row_gradient_owners

    def remove(self) -> None:
        self._handle.remove()


class InertHook:
    """What a copied model holds where the original's :class:`LookupHook` is: a forward hook that does nothing.
    An adversary built on the copy puts its own hook there."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        return None


_hooks: weakref.WeakKeyDictionary[nn.Module, LookupHook] = weakref.WeakKeyDictionary()


def lookup_hook(module: nn.Module) -> LookupHook:
    """The module's hook, registered at the first call."""
    hook = _hooks.get(module)
    if hook is None:
        hook = _hooks[module] = LookupHook(module)
    return hook


def release(module: nn.Module, hook: LookupHook) -> None:
    """Take the hook off the module once nothing uses it."""
    if hook.idle and _hooks.get(module) is hook:
        hook.remove()
        del _hooks[module]


class Subscription:
    """A subscriber's place in a module's hook; :meth:`remove` takes it out (and the hook, when it was the last)."""

    def __init__(self, module: nn.Module, subscriber: Subscriber) -> None:
        self._module = weakref.ref(module)
        self._hook = lookup_hook(module)
        self._key: int | None = self._hook.subscribe(subscriber)

    def remove(self) -> None:
        module = self._module()
        if self._key is None:
            return
        self._hook.unsubscribe(self._key)
        self._key = None
        if module is not None:
            release(module, self._hook)


def data_parallel_seen(modules: list[nn.Module]) -> list[nn.Module]:
    """The DDP wrappers whose forward last looked each of ``modules`` up, in their order (none seen: empty)."""
    seen = [hook.data_parallel for m in modules if (hook := _hooks.get(m)) is not None]
    return [wrapper for wrapper in seen if wrapper is not None]


def subscribe(module: nn.Module, subscriber: Subscriber) -> Subscription:
    """Call ``subscriber(module, ids, output)`` at each of ``module``'s lookups, after the earlier subscribers."""
    return Subscription(module, subscriber)


class RowGradientHooks:
    """Makes every nn.Embedding of a model add its weight gradient into a dense ``.grad`` as rows.

    Each module's lookup hook, which runs before any other hook, then remakes the output while its
    table's ``.grad`` holds a dense gradient (every pass after a step's first, every pass with
    ``zero_grad(set_to_none=False)``) by :func:`fastadv.ops.row_gradient_lookup`, so the backward
    adds one sum per distinct row into ``.grad`` (bitwise torch's numbers on the CPU) instead of
    building a V x d gradient and adding that. The output's values are the module's own. Left to
    torch: the first pass (``.grad`` is None: the dense gradient becomes ``.grad``), tables with
    tensor hooks on the weight (they are handed the gradient), frozen or non-leaf weights, batches
    with as many ids as the table has rows, modules whose forward is not a (scaled) lookup, and
    torch.compile'd graphs. ``FASTADV_ROW_GRADIENTS=0`` turns it off.

    Several fastadv objects on one model share the hooks; :meth:`remove` takes this object's share.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = weakref.WeakSet()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                lookup_hook(module).row_gradient_owners += 1
                self._modules.add(module)

    def remove(self) -> None:
        for module in list(self._modules):
            hook = _hooks.get(module)
            if hook is not None:
                hook.row_gradient_owners -= 1
                release(module, hook)
        self._modules = weakref.WeakSet()

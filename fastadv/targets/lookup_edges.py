"""The recent lookups of an embedding module as autograd edges, for the methods that need dL/de itself."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .hook import subscribe
from .scale import lookup_scale, on_output, raw_gradient


class LookupEdges:
    """The recent lookups of one nn.Embedding, as gradient edges, and a delta added to the next ones.

    For methods that need dL/de with respect to the embedding output e itself (the gradient
    penalty, PGD's intermediate passes): each lookup with gradients is remembered by its token ids
    and its autograd edge, which holds no activations, so ``torch.autograd.grad(loss, edges)``
    gives dL/de, and ``create_graph=True`` its differentiable form. A frozen table's output is
    made a leaf that requires grad, so the edge exists there too. e is the raw lookup
    ``weight[ids]``: for a module that scales it, :meth:`raw_gradients` takes dL/d(output) there,
    and a delta given to :meth:`adding` is scaled onto the output (see fastadv.targets.scale). While
    ``adding(deltas)`` is active, the i-th lookup gets ``deltas[i]``.
    """

    RECENT = 32  # lookups remembered; older ones belong to passes whose loss is long gone

    def __init__(self, name: str, module: nn.Embedding) -> None:
        self.name = name
        self.module = module
        self._lookups: deque = deque(maxlen=self.RECENT)  # (ids, GradientEdge, scale) per lookup
        self._deltas: list[torch.Tensor | None] | None = None
        self._next = 0
        self._handle = subscribe(module, self._on_lookup)

    def remove(self) -> None:
        self._handle.remove()

    def clear(self) -> None:
        """Forget earlier lookups (before a pass whose lookups alone should count)."""
        self._lookups.clear()

    @property
    def edges(self) -> list:
        """The autograd edge of each recorded lookup's output, oldest first."""
        return [edge for _, edge, _ in self._lookups]

    @property
    def ids(self) -> list[torch.Tensor]:
        """The token ids of each recorded lookup, in the order of :attr:`edges`."""
        return [ids for ids, _, _ in self._lookups]

    def raw_gradients(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """dL/d(raw lookup) from the dL/d(output) of each recorded lookup (None stays None); differentiable."""
        scales = [scale for _, _, scale in self._lookups]
        return [None if g is None else raw_gradient(g, scale) for g, scale in zip(grads, scales, strict=True)]

    def _on_lookup(self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        ids = ids.detach()
        if self._deltas is not None:
            if self._next >= len(self._deltas):
                raise RuntimeError(
                    f"the perturbed pass looked up '{self.name}' more often than the clean pass "
                    f"({len(self._deltas)} times): the closure must run the same forward pass both times."
                )
            delta = self._deltas[self._next]
            self._next += 1
            if delta is None:  # this lookup did not reach the loss: nothing to add
                return None
            if delta.shape != output.shape:
                raise RuntimeError(
                    f"the perturbed pass looked up '{self.name}' with output shape {tuple(output.shape)}, the clean "
                    f"pass with {tuple(delta.shape)}: the closure must run the same batch both times."
                )
            return output + on_output(delta, lookup_scale(module, ids, output)).to(output.dtype)
        if not torch.is_grad_enabled():
            return None
        scale = lookup_scale(module, ids, output)
        replaced = None
        if not output.requires_grad:
            output = replaced = output.detach().requires_grad_()
        self._lookups.append((ids, get_gradient_edge(output), scale))
        return replaced

    @contextmanager
    def adding(self, deltas: list[torch.Tensor | None]) -> Iterator[None]:
        """Add ``deltas[i]`` (on the raw lookup) to the i-th lookup inside the block (None: add nothing)."""
        self._deltas, self._next = deltas, 0
        try:
            yield
        finally:
            self._deltas = None

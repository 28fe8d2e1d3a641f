"""Output-side perturbation: delta added to an embedding's output in a forward hook.

The weight is never written, so this works where weight-row perturbation cannot: a frozen
embedding (LoRA/PEFT), one tied to the output projection, one sharded by an engine, and under
gradient accumulation (it uses the current micro-batch's dL/de, never the accumulated ``.grad``).

- share_rows=True: one delta per distinct token id, from dL/de summed over the positions holding
  that id, which is the lookup's weight gradient; wherever weight mode is valid, the two modes
  perturb the forward pass identically.
- share_rows=False: one delta per token position (B x T x d), normalized over the whole batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .errors import MissingGradientError
from .ops import RowSet, rows_l2_norm, segment_sum_by_id
from .ops.backend import Backend


class OutputTarget:
    """The output of one nn.Embedding, perturbed in a forward hook while attacking.

    It keeps dL/de of the current micro-batch: every lookup's output gradient is captured by a
    tensor hook, and the first forward pass with gradients after a capture starts a new
    micro-batch. The adversarial pass (while attacking) captures nothing.
    """

    def __init__(self, name: str, module: nn.Embedding, share_rows: bool) -> None:
        self.name = name
        self.module = module
        self.param = module.weight  # identity and device only: never written
        self.share_rows = share_rows
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, dL/de) per lookup
        self._capture_complete = False
        self._grad: torch.Tensor | None = None
        self._rows: RowSet | None = None
        self._delta: torch.Tensor | None = None  # set while attacking
        self._shape: torch.Size | None = None  # share_rows=False: the batch's ids shape
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def __repr__(self) -> str:
        return f"OutputTarget({self.name!r}, share_rows={self.share_rows})"

    def remove(self) -> None:
        self._handle.remove()

    # ------------------------------------------------------------ hooks

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        ids = (args[0] if args else kwargs["input"]).detach()
        if self._delta is not None:
            return output + self._perturbation(ids).to(output.dtype)
        if not torch.is_grad_enabled():
            return None
        if self._capture_complete:  # a new micro-batch: the previous one's gradients are spent
            self._captured.clear()
            self._capture_complete = False
        replaced = None
        if not output.requires_grad:  # frozen table: the output becomes a leaf whose gradient we read
            output = replaced = output.detach().requires_grad_()
        output.register_hook(lambda grad: self._capture(ids, grad))
        return replaced

    def _capture(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        self._captured.append((ids, grad.detach()))
        self._capture_complete = True

    # ------------------------------------------------------------ the attack

    def check_trainable(self) -> None:
        """Output mode needs no trainable weight."""

    def prepare(self, backend: Backend) -> None:
        """Sum the captured dL/de per token id (or keep it per position); raises before anything changes."""
        if not self._captured:
            raise MissingGradientError(
                f"no gradient reached the output of '{self.name}' since its last forward pass. Call "
                "loss.backward() on the clean loss before attack(); if you did, the embedding's output does "
                "not reach the loss (or the fastadv object was created after the forward pass)."
            )
        d = self._captured[0][1].shape[-1]
        ids = _joined([i.reshape(-1) for i, _ in self._captured]).to(torch.int64)
        grads = _joined([g.reshape(-1, d) for _, g in self._captured])
        if self.share_rows:
            if self.module.padding_idx is not None:  # as in weight mode: the padding row gets no gradient
                grads = torch.where((ids == self.module.padding_idx)[:, None], 0.0, grads)
            self._rows, self._grad = segment_sum_by_id(grads, ids, backend=backend)
        else:
            if len(self._captured) > 1:
                raise MissingGradientError(
                    f"share_rows=False perturbs each token position of one batch, but '{self.name}' was looked "
                    f"up {len(self._captured)} times in the last backward pass. Use share_rows=True."
                )
            self._shape = self._captured[0][0].shape
            positions = torch.arange(ids.numel(), device=ids.device)
            self._rows, self._grad = RowSet(positions, positions), grads

    def gradient_norm(self, backend: Backend) -> torch.Tensor:
        """fp32 0-dim: the L2 norm of the weight-equivalent gradient (share_rows) or of dL/de."""
        assert self._grad is not None and self._rows is not None, "prepare() first"
        return rows_l2_norm(self._grad, self._rows, backend)

    def add(self, epsilon: float, norm: torch.Tensor, ok: torch.Tensor, sign: bool, backend: Backend) -> None:
        """Arm the forward hook with delta = epsilon * g / norm (or epsilon * sign(g)); 0 when not ``ok``."""
        assert self._grad is not None, "prepare() first"
        g = self._grad.float()
        # One new buffer (the captured gradient itself is not ours to modify); a skip zeroes it.
        delta = torch.sign(g).mul_(epsilon) if sign else g.mul(epsilon).div_(norm)
        self._delta = delta.masked_fill_(~ok, 0.0)
        self._grad = None

    def restore(self) -> None:
        """Disarm the hook. Nothing was written, so there is nothing to copy back.

        The clean pass's gradient stays until the next forward pass with gradients (a new
        micro-batch), so attack() may run again on it, as weight mode may on ``.grad``.
        """
        self._delta = self._rows = self._shape = None

    def _perturbation(self, ids: torch.Tensor) -> torch.Tensor:
        """delta for each position of ``ids``: [*ids.shape, d]."""
        assert self._delta is not None and self._rows is not None
        if not self.share_rows:
            if ids.shape != self._shape:
                raise RuntimeError(
                    f"share_rows=False holds one delta per token position of a batch of shape {tuple(self._shape)}, "
                    f"but the adversarial forward looked up {tuple(ids.shape)}: run it on the same batch."
                )
            return self._delta.view(*ids.shape, -1)
        flat = ids.reshape(-1).to(torch.int64)
        rows = self._rows.rows
        # Sorted rows: the first slot holding each id; ids the clean pass never saw get no delta.
        slot = torch.searchsorted(rows, flat).clamp_(max=max(rows.numel() - 1, 0))
        seen = rows[slot] == flat
        delta = self._delta.index_select(0, self._rows.grad_rows[slot]) * seen[:, None]
        return delta.view(*ids.shape, -1)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without the copy when there is one part (the usual single lookup per pass)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class EmbeddingOutputs:
    """The recent lookups of one nn.Embedding, as gradient edges, and a delta added to the next ones.

    For methods that need dL/de with respect to the embedding output e itself (the gradient
    penalty): each lookup with gradients is remembered by its autograd edge, which holds no
    activations, so ``torch.autograd.grad(loss, edges)`` gives dL/de, and ``create_graph=True``
    its differentiable form. A frozen table's output is made a leaf that requires grad, so the
    edge exists there too. While ``adding(deltas)`` is active, the i-th lookup gets ``deltas[i]``.
    """

    RECENT = 32  # lookups remembered; older ones belong to passes whose loss is long gone

    def __init__(self, name: str, module: nn.Embedding) -> None:
        self.name = name
        self.module = module
        self._edges: deque = deque(maxlen=self.RECENT)
        self._deltas: list[torch.Tensor | None] | None = None
        self._next = 0
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def clear(self) -> None:
        """Forget earlier lookups (before a pass whose lookups alone should count)."""
        self._edges.clear()

    @property
    def edges(self) -> list:
        return list(self._edges)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
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
            return output + delta.to(output.dtype)
        if not torch.is_grad_enabled():
            return None
        replaced = None
        if not output.requires_grad:
            output = replaced = output.detach().requires_grad_()
        self._edges.append(get_gradient_edge(output))
        return replaced

    @contextmanager
    def adding(self, deltas: list[torch.Tensor | None]) -> Iterator[None]:
        """Add ``deltas[i]`` to the i-th lookup inside the block (None: add nothing)."""
        self._deltas, self._next = deltas, 0
        try:
            yield
        finally:
            self._deltas = None

"""Output-side perturbation: delta added to an embedding's output in a forward hook.

The weight is never written, so this works where weight-row perturbation cannot: a frozen
embedding (LoRA/PEFT), one tied to the output projection, one sharded by an engine, and under
gradient accumulation (it uses the current micro-batch's dL/de, never the accumulated ``.grad``).

- share_rows=True: one delta per distinct token id, from dL/de summed over the positions holding
  that id, which is the lookup's weight gradient; wherever weight mode is valid, the two modes
  perturb the forward pass identically.
- share_rows=False: one delta per token position (B x T x d), normalized over the whole batch.

Under DDP or FSDP2 (``group`` set) the per-id rows are averaged over the ranks, and the per-position
norm is taken over every rank's positions: the perturbation one process on the whole batch makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import average_rows_over_ranks
from ..errors import MissingGradientError
from ..ops import RowSet, gather_rows, rows_l2_norm
from ..ops.backend import Backend
from .base import Gradient, Step
from .gradients import LookupGradients, gradient_rows
from .hook import subscribe
from .scale import lookup_scale, on_output, raw_gradient
from .tables import table_rows


class OutputTarget:
    """The lookups of one table, perturbed in forward hooks on the modules that look it up.

    Every module named (T5, BART: the encoder's and the decoder's) gets the same per-id delta, as
    weight rows would give them. The delta lives on the raw lookup ``weight[ids]``: a module that
    scales its lookup (Gemma's, BART's ``*ScaledWordEmbedding``) gets ``scale * delta`` on its
    output, and its dL/d(output) is taken back to the raw lookup (see fastadv.targets.scale).

    It keeps dL/de of the last backward pass that reached the lookups: each lookup's output
    gradient is captured by a tensor hook, and the first capture after a forward pass with
    gradients starts a new set (a forward without a backward, e.g. a metric computed with
    gradients on, changes nothing). The adversarial pass (while attacking) captures nothing,
    unless ``capture_perturbed`` is set (PGD ascends along the gradient at the perturbed point).
    """

    def __init__(self, name: str, modules: list[nn.Embedding], share_rows: bool) -> None:
        self.name = name
        self.modules = list(modules)
        self.param = modules[0].weight  # identity and device only: never written
        self.share_rows = share_rows
        self.capture_perturbed = False
        self.group: object | None = None  # data-parallel ranks whose gradients are averaged (DDP, FSDP2)
        paddings = {m.padding_idx for m in self.modules}
        # One padding row for all the modules, or None and each lookup's padding positions zeroed
        self._padding_idx = paddings.pop() if len(paddings) == 1 else None
        self._captured: LookupGradients = []  # (ids, dL/d(raw lookup)) per lookup, of the last backward pass
        self._forward_since_capture = True
        self._armed: OutputDelta | None = None  # while attacking: the delta the forward hooks add
        self._handles = [subscribe(m, self._on_lookup) for m in self.modules]

    def __repr__(self) -> str:
        return f"OutputTarget({self.name!r}, modules={len(self.modules)}, share_rows={self.share_rows})"

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------ hooks

    def _on_lookup(self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        ids = ids.detach()
        armed = self._armed is not None
        capture = torch.is_grad_enabled() and (not armed or self.capture_perturbed)
        if not (armed or capture):
            return None
        scale = lookup_scale(module, ids, output)
        replaced = None
        if capture:
            self._forward_since_capture = True
            if not output.requires_grad:  # frozen table: the output becomes a leaf whose gradient we read
                output = replaced = output.detach().requires_grad_()
            padding = module.padding_idx if self._padding_idx is None else None
            output.register_hook(lambda grad: self._capture(ids, raw_gradient(grad, scale), padding))
        if armed:
            return output + on_output(self._perturbation(ids), scale).to(output.dtype)
        return replaced

    def _capture(self, ids: torch.Tensor, grad: torch.Tensor, padding_idx: int | None) -> None:
        if self._forward_since_capture:  # the first capture of a backward pass: the earlier ones are spent
            self._captured.clear()
            self._forward_since_capture = False
        if padding_idx is not None:  # modules that disagree on the padding row: zero this one's here
            grad = torch.where((ids == padding_idx)[..., None], 0.0, grad)
        self._captured.append((ids, grad.detach()))

    # ------------------------------------------------------------ the attack

    def gradient(
        self, backend: Backend, lookups: LookupGradients | None, average_over_ranks: bool, within: OutputDelta | None
    ) -> Gradient:
        """dL/de summed per token id (or kept per position); raises before anything changes.

        ``lookups`` (ids, dL/d(raw lookup)) replaces the captured gradient (PGD's intermediate
        passes). ``within``, the delta of a PGD round in progress: the gradient is re-addressed to
        its slots. Output mode always uses this rank's own micro-batch gradient, so
        ``average_over_ranks`` changes nothing.
        """
        lookups = self._captured if lookups is None else lookups
        if not lookups:
            raise MissingGradientError(
                f"no gradient reached the lookups of '{self.name}' since fastadv started watching them. Call "
                "loss.backward() on the clean loss before attack(); if you did, the embedding's output does "
                "not reach the loss (or the fastadv object was created after the forward pass)."
            )
        vocab = table_rows(self.param)
        by_freq = any(getattr(m, "scale_grad_by_freq", False) for m in self.modules)
        grad_set, grad = gradient_rows(lookups, vocab, self._padding_idx, self.share_rows, backend, self.name, by_freq)
        if self.group is not None and self.share_rows:  # as one process on the whole batch would see it
            ids = torch.cat([i.reshape(-1) for i, _ in lookups])
            grad, grad_set = average_rows_over_ranks(ids, vocab, grad, grad_set, self.group)
        positions = None if self.share_rows else lookups[0][0].shape
        if within is not None:
            grad, grad_set = gather_rows(grad, grad_set, within.rows.rows), within.rows.as_slots()
            positions = within.positions
        # One delta per position: the norm over every rank's positions, as over the whole batch.
        norm_group = None if self.share_rows else self.group
        return Gradient(grad, grad_set, norm_group, positions)

    def add(self, gradient: Gradient, step: Step, sign: bool, backend: Backend) -> OutputDelta:
        """Arm the forward hooks with delta = size * g / norm (or size * sign(g)); 0 when not ``ok``."""
        g = gradient.values.float()
        # One new buffer (the captured gradient itself is not ours to modify); a skip zeroes it.
        delta = torch.sign(g).mul_(step.size) if sign else g.mul(step.size).div_(step.norm)
        self._armed = OutputDelta(delta.masked_fill_(~step.ok, 0.0), gradient.rows, gradient.positions)
        return self._armed

    def ascend(
        self, gradient: Gradient, step: Step, radius: float, backend: Backend, previous: OutputDelta | None
    ) -> OutputDelta:
        """PGD: delta += size * g / norm, projected into the L2 ball of ``radius`` (unchanged when not ``ok``).

        The first call of a round (``previous`` None) starts from delta = 0 on the gradient's slots.
        """
        moved = gradient.values.float().mul(step.size).div_(step.norm)
        rows = gradient.rows if previous is None else previous.rows
        r = moved if previous is None else moved.add_(previous.delta)
        r_norm = rows_l2_norm(r, rows.as_slots(), backend)
        r = torch.where(r_norm > radius, r * (radius / r_norm), r)
        delta = r.masked_fill_(~step.ok, 0.0) if previous is None else torch.where(step.ok, r, previous.delta)
        self._armed = OutputDelta(delta, rows, gradient.positions)
        return self._armed

    def clean_value(self, perturbation: OutputDelta) -> None:
        """None: the weight is never written, a checkpoint holds it as it is."""
        return None

    def check_restorable(self, perturbation: OutputDelta) -> None:
        """Deltas add up in the forward hook: they come off in any order."""

    def restore(self, perturbation: OutputDelta) -> None:
        """Disarm the hooks. Nothing was written, so there is nothing to copy back.

        The clean pass's gradient stays until the next backward pass reaches the lookups, so
        attack() may run again on it, as weight mode may on ``.grad``.
        """
        self._armed = None

    def _perturbation(self, ids: torch.Tensor) -> torch.Tensor:
        """delta for each position of ``ids``: [*ids.shape, d], fp32."""
        armed = self._armed
        assert armed is not None
        if not self.share_rows:
            if ids.shape != armed.positions:
                batch = tuple(armed.positions or ())
                raise RuntimeError(
                    f"share_rows=False holds one delta per token position of a batch of shape {batch}, "
                    f"but the adversarial forward looked up {tuple(ids.shape)}: run it on the same batch."
                )
            return armed.delta.view(*ids.shape, armed.delta.shape[-1])  # d named: an empty batch has no -1
        # Ids the clean pass never saw get no delta.
        delta = gather_rows(armed.delta, armed.rows.as_slots(), ids.reshape(-1).to(torch.int64))
        return delta.view(*ids.shape, armed.delta.shape[-1])


@dataclass(frozen=True)
class OutputDelta:
    """An output perturbation's handle: delta, fp32 [N, d], on ``rows``' slots (per id, or per position
    of a batch of ids shape ``positions``)."""

    delta: torch.Tensor
    rows: RowSet
    positions: torch.Size | None

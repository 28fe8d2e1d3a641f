"""Gradient penalty on the embedding output: loss + 0.5 * epsilon * ||dL/de||^2, exact or finite-difference."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

import torch
from torch import nn

from ..distributed import DataParallelBinding, data_parallel_wrapper, wrapper_group
from ..errors import FastAdvError, MissingGradientError
from ..targets import LookupEdges, RowGradientHooks, data_parallel_seen, named_tables
from ._common import (
    BackwardFn,
    CarriedState,
    Closure,
    OutputGradientPasses,
    SkipCounter,
    check_emb_name,
    check_epsilon,
    check_flag,
    check_loss,
    output_gradients,
    plain_backward,
    plain_step,
)
from ._finite import FiniteGuard, all_finite

Mode = Literal["finite_difference", "exact"]


class GradientPenalty(CarriedState):
    """Penalize the gradient of the loss with respect to the embedding output e (B x T x d).

    The penalized loss is ``L + 0.5 * epsilon * ||dL/de||^2``, one vector of e per token
    occurrence. Two ways to train on it:

    - ``mode="exact"``: the penalty is built with a double backward (``create_graph=True``). Some
      fused kernels have no double backward (e.g. transformers' default SDPA attention on CPU);
      step() then raises and names the finite-difference mode.
    - ``mode="finite_difference"`` (default): the clean pass computes dL/de only (no parameter
      gradients), then one pass at ``e + epsilon * stopgrad(dL/de)``. Its parameter gradient is
      that of the penalized loss up to O(epsilon^2):
      ``d/dtheta L(e + epsilon * g) = dL/dtheta + epsilon * g . dg/dtheta + O(epsilon^2)``
      and ``g . dg/dtheta = d/dtheta (0.5 * ||g||^2)``. No double backward, one cheap pass.

    Args:
        model: the model being trained; create the object before the forward passes it uses.
        epsilon: penalty weight (and finite-difference step).
        emb_name: None for the input embedding; a string for every nn.Embedding whose weight's
            name contains it.
        mode: "finite_difference" or "exact".
    """

    def __init__(
        self, model: nn.Module, epsilon: float = 1.0, emb_name: str | None = None, mode: Mode = "finite_difference"
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientPenalty needs the nn.Module being trained, found {type(model).__name__}.")
        if mode not in ("finite_difference", "exact"):
            raise ValueError(f"mode must be 'finite_difference' or 'exact', found {mode!r}.")
        self.model = model
        self.epsilon = check_epsilon(epsilon)
        self.emb_name = check_emb_name(emb_name)
        self.mode: Mode = mode
        tables = named_tables(model, emb_name, "The gradient penalty")
        self._edges = [LookupEdges(name, module) for table in tables for name, module in table.modules]
        self._weights = [table.weight for table in tables]
        self._data_parallel = DataParallelBinding(model)  # its ranks divide epsilon (see _rank_epsilon)
        self._row_gradients = RowGradientHooks(model)  # passes into a dense .grad add the table's gradient as rows
        self._hooks_removed = False
        self._skipped = SkipCounter()
        # The finite difference's first pass: autograd.grad, or under reentrant checkpointing a backward() (see
        # OutputGradientPasses); the exact mode's double backward has no such way (it raises there).
        self._first_passes = OutputGradientPasses(model, f"GradientPenalty(mode={mode!r})")
        self._guard = FiniteGuard(model, self._skipped)  # a step whose loss or gradient is not finite: .grad untouched

    def bind_data_parallel(self, model: nn.Module) -> None:
        """Use the DeepSpeed engine (or DDP wrapper) of ``model``, made after this object was built: its ranks
        share the penalty (see ``_rank_epsilon``). A DDP wrapper is also found in the forward pass."""
        self._data_parallel.bind(data_parallel_wrapper(model))

    def __repr__(self) -> str:
        return f"GradientPenalty(epsilon={self.epsilon}, emb_name={self.emb_name!r}, mode={self.mode!r})"

    def penalty(self, loss: torch.Tensor) -> torch.Tensor:
        """The differentiable term ``0.5 * epsilon * ||dL/de||^2`` for the forward pass that produced ``loss``.

        Add it to the loss and backpropagate (needs a model with a double backward). Returns an
        fp32 scalar.
        """
        self._check_hooks()
        loss = check_loss(loss, "penalty(loss): loss")
        grads = self._output_gradients(loss, create_graph=True)
        return 0.5 * self._rank_epsilon() * sum(g.float().square().sum() for g in grads if g is not None)

    def step(
        self,
        closure: Closure,
        backward: BackwardFn | None = None,
        scaler: torch.amp.GradScaler | None = None,
        enabled: bool = True,
    ) -> torch.Tensor:
        """The passes of one penalized training step; returns the clean loss, detached.

        closure() runs a forward pass and returns the loss; ``backward`` (default
        ``loss.backward()``) backpropagates, e.g. ``accelerator.backward``. The optimizer step
        stays the caller's. ``scaler``: under fp16 autocast, the GradScaler; the finite-difference
        clean pass then takes dL/de of the scaled loss (no underflow) and divides the scale out.
        ``enabled=False``: a plain step instead, one forward and one backward of the loss (a warm-up).
        """
        self._check_hooks()
        backward = backward or plain_backward
        if not check_flag(enabled, "enabled"):
            return plain_step(closure, backward)
        self._data_parallel.check_knows_engine(self._weights, f"'{self._edges[0].name}'")
        if self.mode == "exact" and self._data_parallel.deepspeed:
            raise FastAdvError(
                "GradientPenalty(mode='exact') backpropagates through dL/de (a double backward), which a DeepSpeed "
                "engine cannot run: its hooks start one backward per forward, and ZeRO-3 releases the weights the "
                "second backward needs. Use mode='finite_difference' (the default) under DeepSpeed."
            )
        for recorded in self._edges:
            recorded.clear()  # only this closure's lookups count
        self._skipped.begin_step()
        if self.mode == "exact":
            self._guard.arm()
            try:
                return self._exact_step(closure, backward)
            finally:
                self._guard.disarm()
        # A pass for dL/de alone: DDP does not arm its all-reduce, a DeepSpeed engine starts no backward of its own.
        with self._data_parallel.output_gradient_pass():
            loss, grads = self._first_pass_gradients(closure, scaler)
        present = [g for g in grads if g is not None]
        # A non-finite dL/de skips the penalty on the device: the second pass is then a plain one.
        finite = all_finite(present)
        self._skipped.merge_into_last(~finite)
        # autograd.grad's results are ours: scale them in place, zeroed on a skip.
        epsilon = self._rank_epsilon()
        deltas = [None if g is None else g.mul_(epsilon).masked_fill_(~finite, 0.0) for g in grads]
        with ExitStack() as stack:
            start = 0
            for recorded in self._edges:
                count = len(recorded.edges)
                stack.enter_context(recorded.adding(deltas[start : start + count]))
                start += count
            self._guard.arm()
            stack.callback(self._guard.disarm)
            perturbed = check_loss(closure(), "closure()")
            self._guard.loss(perturbed)  # not finite: the step gives .grad nothing (zeros)
            backward(perturbed)
        return loss.detach()

    def _exact_step(self, closure: Closure, backward: BackwardFn) -> torch.Tensor:
        """The exact step's one pass: backward of loss + penalty, guarded (armed by the caller)."""
        loss = check_loss(closure(), "closure()")
        penalized = loss + self.penalty(loss)
        self._guard.loss(penalized)  # not finite: the step gives .grad nothing
        try:
            backward(penalized)
        except RuntimeError as err:
            if "derivative for" in str(err) or "double backward" in str(err):
                raise FastAdvError(
                    "GradientPenalty(mode='exact') needs a double backward, and this model has an op without "
                    f"one ({err}). Use mode='finite_difference' (one extra pass, no double backward), or an "
                    "implementation of that op that supports it (e.g. attn_implementation='eager')."
                ) from err
            raise
        return loss.detach()

    @property
    def skipped_steps(self) -> int:
        """Steps whose dL/de held NaN/Inf (finite difference: penalty skipped), or whose penalized (exact) or
        perturbed (finite difference) pass had a non-finite loss or gradient, every ``.grad`` then zeroed (the NaN
        rule, ``fastadv.methods._finite``). Each step counted once; reading it syncs."""
        return int(self._skipped)

    def remove_hooks(self) -> None:
        """Remove the forward hooks from the embeddings; step() and penalty() then raise."""
        for recorded in self._edges:
            recorded.remove()
        self._row_gradients.remove()
        self._hooks_removed = True

    def _check_hooks(self) -> None:
        if self._hooks_removed:  # nothing records the lookups now: say so, not "run the forward pass"
            raise RuntimeError(
                "GradientPenalty's hooks were removed by remove_hooks(): create a new GradientPenalty to train with it."
            )

    def _rank_epsilon(self) -> float:
        """epsilon for this rank's share of the penalty: epsilon / W under DDP with W ranks.

        Each rank's loss is the mean over its own batch, so its dL/de is W times the whole batch's,
        and the penalty is quadratic in it: epsilon / W on every rank, averaged by DDP, gives the
        one-process penalty of the whole batch (and the finite difference its step). The wrapper is
        the one whose forward looked the embedding up (whenever the object was built).
        """
        wrapper = (
            self._data_parallel.wrapper
            or data_parallel_wrapper(self.model)
            or next(iter(data_parallel_seen([recorded.module for recorded in self._edges])), None)
        )
        if wrapper is None:
            return self.epsilon
        return self.epsilon / torch.distributed.get_world_size(wrapper_group(wrapper))

    def _first_pass_gradients(
        self, closure: Closure, scaler: torch.amp.GradScaler | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The finite difference's first pass: its loss, and dL/de for every recorded lookup of a forward of
        ``closure`` (the scaler's scale divided out, without reading it on the host), through
        :class:`OutputGradientPasses`."""
        scale, clean = None, {}

        def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
            nonlocal scale
            for recorded in self._edges:
                recorded.clear()
            loss = clean["loss"] = check_loss(closure(), "closure()")
            if scaler is not None:
                scale = scaler.scale(torch.ones((), device=loss.device))
                loss = scaler.scale(loss)
            return loss, [edge for recorded in self._edges for edge in recorded.edges]

        grads = self._raw_gradients(self._first_passes.gradients(run))
        return clean["loss"], grads if scale is None else [g if g is None else g.div_(scale) for g in grads]

    def _output_gradients(self, loss: torch.Tensor, create_graph: bool) -> list[torch.Tensor | None]:
        """dL/de for every recorded lookup (None for lookups outside ``loss``'s graph), in order."""
        edges = [edge for recorded in self._edges for edge in recorded.edges]
        found = output_gradients(loss, edges, f"GradientPenalty(mode={self.mode!r})", create_graph=create_graph)
        return self._raw_gradients(found)

    def _raw_gradients(self, found: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """dL/d(output) at each recorded edge to dL/d(raw lookup), per module; refuses a loss that reached none."""
        grads: list[torch.Tensor | None] = []
        for recorded in self._edges:  # dL/d(output) to dL/d(raw lookup), per module
            grads += recorded.raw_gradients(found[len(grads) : len(grads) + len(recorded.edges)])
        if not any(g is not None for g in grads):
            names = ", ".join(f"'{o.name}'" for o in self._edges)
            raise MissingGradientError(
                f"the loss does not depend on any output of {names} recorded in a forward pass with gradients: "
                "run the forward pass that produces the loss after creating GradientPenalty, with gradients "
                "enabled, and make sure the embedding's output reaches the loss."
            )
        return grads

"""PGD on the embedding: a drop-in for the copied snippet, and a step whose inner passes skip parameter grads."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import AttackStateError, EmbeddingNotFoundError, FastAdvError, FastAdvWarning, MissingGradientError
from ..ops import Backend
from ..targets import (
    Gradient,
    LookupEdges,
    LookupRecorder,
    OutputTarget,
    Step,
    Target,
    TargetMode,
    WeightTarget,
    table_modules,
)
from ._attack import EmbeddingAttack
from ._common import (
    BackwardFn,
    Closure,
    OutputGradientPasses,
    check_epsilon,
    check_flag,
    check_loss,
    plain_backward,
    plain_step,
)

SNIPPET_CALLS_NEED_ONLY_BACKWARD = (
    ", or drive PGD with the snippet's calls (attack(is_first_attack=...), restore(), backup_grad(), "
    "restore_grad()), which need only backward()"
)


class PGD(EmbeddingAttack):
    """Projected gradient ascent on the embedding, ``steps`` times per training step, restored afterwards.

    Each attack moves the embedding by ``alpha * g / ||g||`` and projects the displacement ``r``
    from the clean embedding back into the ball ``||r|| <= epsilon``. As with FGM, only the rows of
    the batch's tokens are touched (weight mode), or the delta lives on the embedding's output
    (output mode, for frozen, tied and sharded tables; see ``target``).

    Two ways to drive it:

    - the snippet's calls, unchanged (``attack(is_first_attack=...)``, ``restore()``,
      ``backup_grad()``, ``restore_grad()``): same schedule, same numbers in fp32;
    - ``pgd.step(closure)``: the same schedule, but the ``steps - 1`` intermediate passes compute
      only dL/de, the gradient with respect to the embedding output (``torch.autograd.grad``): no
      parameter gradients, so no weight-gradient matrix products and no copy of the parameter
      gradients. The last pass is a full backward that accumulates onto the clean gradient.

    Args:
        model: the model being trained. Create PGD before the forward pass whose gradient it uses.
            Under DDP, wrapped or not (or ``ddp_model.module``), as for :class:`fastadv.FGM`.
        epsilon: radius of the L2 ball around the clean embedding (per matched parameter).
        alpha: size of each ascent step; ``alpha > epsilon`` is allowed but warned.
        steps: K, the number of attacks per training step (the snippet's K), >= 1.
        emb_name: None for the input embedding; a string for every parameter whose name contains
            it, as in the snippet.
        target, share_rows: where the perturbation lives, as for :class:`fastadv.FGM`.

    Usage (the snippet's loop)::

        pgd = PGD(model)
        loss = model(**batch).loss
        loss.backward()
        pgd.backup_grad()
        for t in range(K):
            pgd.attack(is_first_attack=(t == 0))
            if t != K - 1:
                model.zero_grad()
            else:
                pgd.restore_grad()
            model(**batch).loss.backward()
        pgd.restore()

    or ``loss = pgd.step(lambda: model(**batch).loss)``. All attacks of one round must see the same
    batch: the displacement lives on the rows (or token positions) of the round's first attack.
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        alpha: float = 0.3,
        steps: int = 3,
        emb_name: str | None = None,
        target: TargetMode = "auto",
        share_rows: bool = True,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 (the number of attacks per training step), found {steps!r}.")
        super().__init__(model, emb_name, target, share_rows)
        self.epsilon = check_epsilon(epsilon)
        self.alpha = check_epsilon(alpha, "alpha")
        self.steps = steps
        self._warn_if_alpha_exceeds(self.epsilon, self.alpha)
        self._grad_backup: dict[str, torch.Tensor | None] | None = None
        self._ids_backup: list[tuple[LookupRecorder, torch.Tensor | None]] = []
        self._step_recorders: tuple[list[Target], dict[int, list[LookupEdges]]] | None = None
        # The inner passes' dL/de: autograd.grad, or under reentrant checkpointing a backward() (see the class).
        self._inner_passes = OutputGradientPasses(model, "pgd.step()", SNIPPET_CALLS_NEED_ONLY_BACKWARD)
        self._targets(emb_name)  # fail now, not at the first attack, on a bad emb_name

    def __repr__(self) -> str:
        return (
            f"PGD(epsilon={self.epsilon}, alpha={self.alpha}, steps={self.steps}, emb_name={self.emb_name!r}, "
            f"backend={self.backend!r})"
        )

    # ------------------------------------------------------------ the snippet's API

    def attack(
        self,
        epsilon: float | None = None,
        alpha: float | None = None,
        emb_name: str | None = None,
        is_first_attack: bool = False,
    ) -> None:
        """One ascent step along the current gradient, projected into the epsilon ball.

        Args:
            epsilon, alpha: default the constructor's.
            emb_name: which parameters (default the constructor's); the same for a whole round.
            is_first_attack: True on a round's first attack, which saves the clean rows; the
                later attacks of the round move around them.
        """
        epsilon = self.epsilon if epsilon is None else check_epsilon(epsilon)
        alpha = self.alpha if alpha is None else check_epsilon(alpha, "alpha")
        self._warn_if_alpha_exceeds(epsilon, alpha)
        targets = self._targets(self.emb_name if emb_name is None else emb_name)
        if is_first_attack and self._attacked is not None:
            raise AttackStateError(
                "attack(is_first_attack=True) called while a PGD round is in progress (the embedding is still "
                "perturbed and was left as it is). Call restore() at the end of each round, before the next "
                "round's first attack."
            )
        if not is_first_attack:
            if self._attacked is None:
                raise AttackStateError(
                    "attack(is_first_attack=False) called before the round's first attack, so there are no clean "
                    "rows to project around. Call attack(is_first_attack=(t == 0)) in the loop, as the snippet does."
                )
            if {id(t) for t in targets} != {id(t) for t, _ in self._attacked}:
                raise EmbeddingNotFoundError(
                    f"attack(emb_name={emb_name!r}) names other parameters than this round's first attack "
                    f"({', '.join(t.name for t, _ in self._attacked)}). Use one emb_name for the whole round."
                )
        self._ascend(targets, epsilon, alpha)

    def backup_grad(self) -> None:
        """Save a copy of every trainable parameter's gradient (the snippet's semantics; costs one
        model's worth of memory: :meth:`step` needs none)."""
        self._grad_backup = {
            name: None if p.grad is None else p.grad.clone()
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }
        # The rows those gradients live on: the zero_grad() between the attacks empties the record.
        self._ids_backup = [(recorder, recorder.ids()) for recorder in self._recorders.values()]

    def restore_grad(self) -> None:
        """Put the gradients saved by :meth:`backup_grad` back (``param.grad = saved``), and their rows in
        the record (under gradient accumulation they include earlier micro-batches' rows)."""
        if self._grad_backup is None:
            raise AttackStateError("restore_grad() called without backup_grad(): there is no gradient to restore.")
        saved, self._grad_backup = self._grad_backup, None
        for name, p in self.model.named_parameters():
            if name in saved:
                p.grad = saved[name]
        for recorder, ids in self._ids_backup:
            recorder.add_ids(ids)

    # ------------------------------------------------------------ the fast step

    def step(
        self,
        closure: Closure,
        backward: BackwardFn | None = None,
        scaler: torch.amp.GradScaler | None = None,
        enabled: bool = True,
    ) -> torch.Tensor:
        """One PGD training step's passes: clean backward, K attacks with K-1 dL/de-only passes, one
        full adversarial backward, restore.

        Args:
            closure: runs a forward pass and returns the loss (a scalar tensor); called K + 1 times.
            backward: how to backpropagate a loss (default ``loss.backward()``), e.g.
                ``accelerator.backward``. The intermediate passes do not use it: they take dL/de with
                ``torch.autograd.grad``, whose direction does not depend on loss scaling.
            scaler: under fp16 autocast, the GradScaler: the intermediate passes then scale the loss
                by it too, so small gradients do not underflow to zero (an overflow skips the step).
            enabled: False: a plain step instead, one forward and one backward of the loss (a warm-up
                before the adversary starts, as ``adversary_start_step`` runs it).

        Returns:
            The clean loss, detached. The gradient holds clean + adversarial (at the last attack), as
            in the snippet's loop; the optimizer step stays the caller's.
        """
        if self._attacked is not None:
            raise AttackStateError("step() called while an attack is in progress: call restore() first.")
        backward = backward or plain_backward
        if not check_flag(enabled, "enabled"):
            return plain_step(closure, backward)
        targets = self._targets(self.emb_name)
        lookups = self._lookup_edges(targets)
        with self._data_parallel.accumulate_only():  # DeepSpeed: the last pass alone is the boundary
            loss = check_loss(closure(), "closure()")
            backward(loss)
        # Again after the clean pass: a DDP forward that no earlier step ran (the model wrapped after PGD was
        # built, or PGD built on ddp.module) binds its wrapper here, and the targets take its group.
        targets = self._targets(self.emb_name)
        lookups = self._lookup_edges(targets)
        try:
            gradients = None  # the first attack reads the clean gradient (.grad, or dL/de captured)
            for t in range(self.steps):
                self._ascend(targets, self.epsilon, self.alpha, gradients)
                if t == self.steps - 1:
                    adversarial = check_loss(closure(), "closure()")
                    self._guard.loss(adversarial)  # not finite: the step gives .grad nothing (zeros)
                    backward(adversarial)
                else:
                    gradients = self._output_gradients(targets, lookups, closure, scaler)
        finally:
            if self._attacked is not None:
                self.restore()
        return loss.detach()

    # ------------------------------------------------------------ internals

    def _targets(self, emb_name: str | None) -> list[Target]:
        targets = super()._targets(emb_name)
        for target in targets:
            if isinstance(target, OutputTarget):  # the snippet's inner passes give the gradient to ascend along
                target.capture_perturbed = True
        return targets

    def _ascend(self, targets: list[Target], epsilon: float, alpha: float, gradients: dict | None = None) -> None:
        before = dict(self._attacked or [])  # each target's perturbation so far in this round

        def ascend(target: Target, gradient: Gradient, step: Step, backend: Backend) -> object:
            return target.ascend(gradient, step, epsilon, backend, before.get(target))

        self._perturb(targets, alpha, ascend, gradients)

    def _lookup_edges(self, targets: list[Target]) -> dict[int, list[LookupEdges]]:
        """The lookup recorders of each target's embedding modules, by target id (made on first use,
        then kept for as long as the targets are: step() runs every training step)."""
        if self._step_recorders is not None and self._step_recorders[0] is targets:
            return self._step_recorders[1]
        recorders = {}
        for target in targets:
            if isinstance(target, WeightTarget) and target.recorder is None:
                raise FastAdvError(
                    f"pgd.step() takes its intermediate gradients with respect to embedding outputs, and "
                    f"'{target.name}' is not an embedding table. Pass an emb_name that matches embedding tables "
                    "only, or use the snippet's calls (attack/restore/backup_grad/restore_grad)."
                )
            if isinstance(target, OutputTarget):
                modules = target.modules
            else:  # weight rows: every lookup of the table sees them
                modules = [m for _, m in table_modules(self.model, target.param)]
            for module in modules:
                if id(module) not in self._edges:
                    self._edges[id(module)] = LookupEdges(target.name, module)
            recorders[id(target)] = [self._edges[id(m)] for m in modules]
        self._step_recorders = (targets, recorders)
        return recorders

    def _output_gradients(
        self,
        targets: list[Target],
        lookups: dict[int, list[LookupEdges]],
        closure: Closure,
        scaler: torch.amp.GradScaler | None,
    ) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One perturbed pass; dL/de of every lookup of each target's modules, as (ids, dL/de) by target id."""
        recorders = {id(r): r for rs in lookups.values() for r in rs}

        def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
            for recorder in recorders.values():
                recorder.clear()
            loss = check_loss(closure(), "closure()")
            if scaler is not None:  # only the direction is used: the scale needs no undoing
                loss = scaler.scale(loss)
            return loss, [e for r in recorders.values() for e in r.edges]

        # It computes no parameter gradient: under DDP it must not arm the all-reduce, under DeepSpeed not start a
        # backward of the engine's.
        with self._data_parallel.output_gradient_pass():
            grads = self._inner_passes.gradients(run)
        by_recorder: dict[int, list] = {}
        for key, recorder in recorders.items():  # dL/d(output) to dL/d(raw lookup), per module
            mine, grads = grads[: len(recorder.edges)], grads[len(recorder.edges) :]
            pairs = zip(recorder.ids, recorder.raw_gradients(mine), strict=True)
            by_recorder[key] = [(ids, grad) for ids, grad in pairs if grad is not None]
        gradients = {}
        for target in targets:
            pairs = [pair for r in lookups[id(target)] for pair in by_recorder[id(r)]]
            if not pairs:
                raise MissingGradientError(
                    f"the perturbed pass's loss does not depend on any lookup of '{target.name}': the closure must "
                    "run the same forward pass each time, with gradients enabled."
                )
            gradients[id(target)] = pairs
        return gradients

    @staticmethod
    def _warn_if_alpha_exceeds(epsilon: float, alpha: float) -> None:
        if alpha == 0 or epsilon == 0:
            warnings.warn(
                f"PGD {'alpha' if alpha == 0 else 'epsilon'}=0: every attack leaves the embedding as it is, so each "
                "step trains on the clean loss, at the cost of all its passes. Set it above 0, or run plain steps "
                "(pgd.step(..., enabled=False)).",
                FastAdvWarning,
                stacklevel=3,
            )
        elif alpha > epsilon:
            warnings.warn(
                f"PGD alpha={alpha} > epsilon={epsilon}: every step leaves the epsilon ball and is projected back "
                "onto its surface, so the attack moves along the ball's edge. Usual settings have alpha < epsilon "
                "(e.g. epsilon=1.0, alpha=0.3).",
                FastAdvWarning,
                stacklevel=3,
            )

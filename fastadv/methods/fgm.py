"""FGM / FGSM on the input embedding: a drop-in for the copied snippet, on the batch's rows only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..distributed import process_group_initialized
from ..errors import AttackStateError
from ..ops import Backend
from ..targets import Gradient, Step, Target, TargetMode
from ._attack import EmbeddingAttack
from ._common import BackwardFn, Closure, check_epsilon, check_flag, check_loss, plain_backward, plain_step

Norm = Literal["l2", "sign"]


class FGM(EmbeddingAttack):
    """Fast Gradient Method on the embedding: ``E[rows] += epsilon * g / ||g||``, restored afterwards.

    Drop-in for the copied snippet (same calls, same numbers in fp32 wherever the embedding's
    gradient is its lookup's alone), but it touches only the rows of the tokens the batch used:
    U x d work and memory instead of several V x d passes, and no host sync on CUDA.

    Args:
        model: the model being trained. Create FGM before the forward pass whose gradient it uses:
            it hooks every nn.Embedding to record which rows a batch touched. Under DDP: the wrapped
            model, the model before it is wrapped, or ``ddp_model.module`` (the wrapper is then found
            in the forward pass).
        epsilon: default perturbation size for attack().
        emb_name: None perturbs the input embedding (``model.get_input_embeddings()``, else the single
            nn.Embedding). A string perturbs, as the snippet does, every trainable parameter whose
            name contains it, each with its own norm.
        norm: "l2" (FGM) or "sign" (FGSM: ``epsilon * sign(g)``).
        target: where the perturbation lives. "weight": the touched rows of the embedding weight,
            restored afterwards (the snippet's numbers). "output": added to the embedding's output
            in a forward hook, the weight never written: works for frozen (LoRA/PEFT), tied and
            sharded embeddings, and uses the current micro-batch's gradient only. "auto" (default):
            weight rows where they are valid and exact, the output elsewhere (logged at INFO).
        share_rows: output mode only. True: one delta per distinct token id, from dL/de summed per
            id (the same perturbation as weight mode where both apply). False: one delta per token
            position (B x T x d), normalized over the batch.

    Usage::

        fgm = FGM(model)
        loss.backward()
        fgm.attack()              # or fgm.attack(1.0, "word_embeddings"), as the snippet is called
        model(**batch).loss.backward()
        fgm.restore()

    A zero gradient leaves the weights as they are (as the snippet does); a NaN/Inf gradient skips
    the step on the device, weights untouched, and is counted in :attr:`skipped_steps`.
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        emb_name: str | None = None,
        norm: Norm = "l2",
        target: TargetMode = "auto",
        share_rows: bool = True,
    ) -> None:
        if norm not in ("l2", "sign"):
            raise ValueError(f"norm must be 'l2' (FGM) or 'sign' (FGSM), found {norm!r}.")
        super().__init__(model, emb_name, target, share_rows)
        self.epsilon = check_epsilon(epsilon)
        self.norm: Norm = norm
        self._targets(emb_name)  # fail now, not at the first attack, on a bad emb_name

    def __repr__(self) -> str:
        return f"FGM(epsilon={self.epsilon}, emb_name={self.emb_name!r}, norm={self.norm!r}, backend={self.backend!r})"

    # ------------------------------------------------------------ the snippet's API

    def attack(self, epsilon: float | None = None, emb_name: str | None = None) -> None:
        """Perturb the embedding along its gradient. Call after the clean backward pass.

        Args:
            epsilon: perturbation size (default: the constructor's).
            emb_name: which parameters (default: the constructor's); see the class docstring.
        """
        if self._attacked is not None:
            names = ", ".join(t.name for t, _ in self._attacked)
            raise AttackStateError(
                f"attack() called again before restore(); {names} is still perturbed and was left as it is. "
                "Call restore() after the adversarial backward pass, before the next attack()."
            )
        self._attack(epsilon, emb_name)

    def _attack(self, epsilon: float | None, emb_name: str | None, average_over_ranks: bool = False) -> None:
        epsilon = self.epsilon if epsilon is None else check_epsilon(epsilon)
        targets = self._targets(self.emb_name if emb_name is None else emb_name)
        sign = self.norm == "sign"

        def add(target: Target, gradient: Gradient, step: Step, backend: Backend) -> object:
            return target.add(gradient, step, sign, backend)

        # The sign's step is epsilon on every coordinate, so a zero norm does not skip it.
        self._perturb(targets, epsilon, add, average_over_ranks=average_over_ranks, skip_zero=not sign)

    # ------------------------------------------------------------ conveniences

    @contextmanager
    def perturbed(self, epsilon: float | None = None, emb_name: str | None = None) -> Iterator[FGM]:
        """``with fgm.perturbed():`` attacks on entry and restores on exit, exceptions included."""
        self.attack(epsilon, emb_name)
        try:
            yield self
        finally:
            self.restore()

    def step(
        self,
        closure: Closure,
        backward: BackwardFn | None = None,
        clean_no_sync: bool = False,
        enabled: bool = True,
    ) -> torch.Tensor:
        """One adversarial training step's passes: clean backward, attack, adversarial backward, restore.

        Args:
            closure: runs a forward pass and returns the loss (a scalar tensor).
            backward: how to backpropagate a loss (default ``loss.backward()``); pass e.g.
                ``accelerator.backward`` or ``lambda l: scaler.scale(l).backward()``.
            clean_no_sync: DDP only: run the clean pass under ``no_sync()``, so the gradients are
                all-reduced once, after the adversarial pass, instead of after each pass. The attack
                then averages only the table rows it needs (U x d) over the ranks. Same numbers. Until
                FGM knows the wrapper (given, bound, or seen in a forward pass: FGM built before
                wrapping learns it in its first step), the clean pass runs with the gradients all-reduced.
                Under a DeepSpeed engine the clean pass is always off the accumulation boundary (the engine
                reduces once, at the adversarial pass); pass ``backward=engine.backward`` there.
            enabled: False: a plain step instead, one forward and one backward of the loss (a warm-up
                before the adversary starts, as ``adversary_start_step`` runs it).

        Returns:
            The clean loss, detached. The optimizer step stays the caller's.
        """
        backward = backward or plain_backward
        if not check_flag(enabled, "enabled"):
            return plain_step(closure, backward)
        self._targets(self.emb_name)  # output targets (e.g. made when bound to an engine) must see the clean pass
        if clean_no_sync:
            self._bind_data_parallel_seen()  # the wrapper an earlier step's forward ran in
        if clean_no_sync and self._data_parallel.wrapper is None and not process_group_initialized():
            raise ValueError(
                "clean_no_sync=True runs the clean pass under DistributedDataParallel.no_sync(), but torch.distributed "
                "is not initialized, so there is no DDP wrapper. Leave clean_no_sync False."
            )
        # A DeepSpeed engine's clean pass is always off the accumulation boundary: it reduces once, at the last pass.
        if (clean_no_sync or self._data_parallel.deepspeed) and self._data_parallel.wrapper is not None:
            with self._data_parallel.no_sync():
                loss = check_loss(closure(), "closure()")
                backward(loss)
            self._attack(None, None, average_over_ranks=True)
        else:  # also clean_no_sync's first step when the wrapper is not known yet
            loss = check_loss(closure(), "closure()")
            backward(loss)
            self.attack()
        try:
            adversarial = check_loss(closure(), "closure()")
            self._guard.loss(adversarial)  # not finite: the step gives .grad nothing (zeros)
            backward(adversarial)
        finally:
            self.restore()
        return loss.detach()

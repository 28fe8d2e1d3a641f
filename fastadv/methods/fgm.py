"""FGM / FGSM on the input embedding: a drop-in for the copied snippet, on the batch's rows only."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..errors import AttackStateError, EmbeddingNotFoundError, FastAdvWarning
from ..ops import Backend, resolve_backend
from ..output_target import OutputTarget
from ..target import Target, TargetMode, attach_recorders, resolve_targets, tied_targets
from ._common import BackwardFn, Closure, SkipCounter, check_epsilon, check_loss, plain_backward

Norm = Literal["l2", "sign"]


class FGM:
    """Fast Gradient Method on the embedding: ``E[rows] += epsilon * g / ||g||``, restored afterwards.

    Drop-in for the copied snippet (same calls, same numbers in fp32 wherever the embedding's
    gradient is its lookup's alone), but it touches only the rows of the tokens the batch used:
    U x d work and memory instead of several V x d passes, and no host sync on CUDA.

    Args:
        model: the model being trained. Create FGM before the forward pass whose gradient it uses:
            it hooks every nn.Embedding to record which rows a batch touched.
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"FGM needs the nn.Module being trained, found {type(model).__name__}.")
        if norm not in ("l2", "sign"):
            raise ValueError(f"norm must be 'l2' (FGM) or 'sign' (FGSM), found {norm!r}.")
        if target not in ("auto", "weight", "output"):
            raise ValueError(f"target must be 'auto', 'weight' or 'output', found {target!r}.")
        self.model = model
        self.epsilon = check_epsilon(epsilon)
        self.emb_name = emb_name
        self.norm: Norm = norm
        self.target: TargetMode = target
        self.share_rows = bool(share_rows)
        self.backend: Backend | None = None  # the backend of the last attack()
        self._recorders = attach_recorders(model)
        self._outputs: dict[int, OutputTarget] = {}  # one output hook per module, made on demand
        # The hooks hold the recorders, not this object: when it is collected, they come off the model.
        self._detach = weakref.finalize(self, _remove_hooks, self._recorders, self._outputs)
        self._targets_by_name: dict[str | None, list[Target]] = {}
        self._attacked: list[Target] | None = None
        self._skipped = SkipCounter()
        self._warned_tied = False
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
            names = ", ".join(t.name for t in self._attacked)
            raise AttackStateError(
                f"attack() called again before restore(); {names} is still perturbed and was left as it is. "
                "Call restore() after the adversarial backward pass, before the next attack()."
            )
        epsilon = self.epsilon if epsilon is None else check_epsilon(epsilon)
        targets = self._targets(self.emb_name if emb_name is None else emb_name)
        device = targets[0].param.device
        backend = resolve_backend(device)
        for target in targets:
            target.prepare(backend)
        norms = torch.stack([t.gradient_norm(backend).to(device) for t in targets])
        # A non-finite gradient anywhere skips the whole step, on the device: weights stay untouched.
        finite = torch.isfinite(norms).all()
        done: list[Target] = []
        try:
            for target, norm in zip(targets, norms, strict=True):
                ok = finite if self.norm == "sign" else finite & (norm > 0)
                target.add(epsilon, norm, ok, self.norm == "sign", backend)
                done.append(target)
        except BaseException:
            for target in done:
                target.restore()
            raise
        self._skipped.add(~finite)
        self._attacked = targets
        self.backend = backend

    def restore(self, emb_name: str | None = None) -> None:
        """Put back, bit for bit, the rows the last attack() changed.

        ``emb_name``, if given, must name the parameters that attack() perturbed.
        """
        if self._attacked is None:
            raise AttackStateError("restore() called without a matching attack(): there is nothing to restore.")
        if emb_name is not None:
            asked = {id(t.param) for t in self._targets(emb_name)}
            if asked != {id(t.param) for t in self._attacked}:
                attacked = ", ".join(t.name for t in self._attacked)
                raise EmbeddingNotFoundError(
                    f"restore(emb_name={emb_name!r}) names other parameters than attack() perturbed ({attacked}); "
                    "they are still perturbed. Call restore() with the attack's emb_name, or with none."
                )
        targets, self._attacked = self._attacked, None
        for target in targets:
            target.restore()

    # ------------------------------------------------------------ conveniences

    @contextmanager
    def perturbed(self, epsilon: float | None = None, emb_name: str | None = None) -> Iterator[FGM]:
        """``with fgm.perturbed():`` attacks on entry and restores on exit, exceptions included."""
        self.attack(epsilon, emb_name)
        try:
            yield self
        finally:
            self.restore()

    def step(self, closure: Closure, backward: BackwardFn | None = None) -> torch.Tensor:
        """One adversarial training step's passes: clean backward, attack, adversarial backward, restore.

        Args:
            closure: runs a forward pass and returns the loss (a scalar tensor).
            backward: how to backpropagate a loss (default ``loss.backward()``); pass e.g.
                ``accelerator.backward`` or ``lambda l: scaler.scale(l).backward()``.

        Returns:
            The clean loss, detached. The optimizer step stays the caller's.
        """
        backward = backward or plain_backward
        loss = check_loss(closure(), "closure()")
        backward(loss)
        with self.perturbed():
            backward(check_loss(closure(), "closure()"))
        return loss.detach()

    @property
    def skipped_steps(self) -> int:
        """Attacks skipped because the gradient held NaN/Inf. Reading it syncs with the device."""
        return int(self._skipped)

    def remove_hooks(self) -> None:
        """Detach the lookup hooks from the model now (done anyway when this FGM is collected)."""
        self._detach()
        self._targets_by_name.clear()

    # ------------------------------------------------------------ internals

    def _targets(self, emb_name: str | None) -> list[Target]:
        targets = self._targets_by_name.get(emb_name)
        if targets is None:
            targets = resolve_targets(
                self.model, emb_name, self._recorders, self.target, self.share_rows, self._outputs
            )
            self._targets_by_name[emb_name] = targets
            self._warn_if_tied(targets)
        return targets

    def _warn_if_tied(self, targets: list[Target]) -> None:
        for target, names in tied_targets(self.model, targets):
            if self._warned_tied:
                return
            self._warned_tied = True
            warnings.warn(
                f"'{target.name}' is tied to {', '.join(repr(n) for n in names if n != target.name)} (input and "
                "output embeddings share one matrix). fastadv perturbs only the rows of the batch's tokens, "
                "with the norm taken over those rows; the copied snippet perturbs every row of the shared "
                "matrix, output projection included, so the numbers differ from the snippet on this model. "
                "target='output' (or 'auto') perturbs the input lookup alone.",
                FastAdvWarning,
                stacklevel=3,
            )


def _remove_hooks(recorders: dict, outputs: dict) -> None:
    for hooked in (*recorders.values(), *outputs.values()):
        hooked.remove()
    recorders.clear()
    outputs.clear()

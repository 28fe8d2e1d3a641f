"""The output-consistency family: VAT, SMART and R3F, a divergence of the model's outputs under a perturbation
of the word-embedding output, added to the task loss.

Each perturbs the raw lookup ``weight[ids]`` of the input embedding, one vector per token position
(B x T x d, for ids of shape B x T), in the forward hook every fastadv method uses: no ``inputs_embeds``,
the weight never written, so frozen (LoRA/PEFT), tied and shared tables work and every lookup of the
table gets its own delta. The closure returns what the term needs (see :func:`loss_and_logits`); the
divergences are taken over the logits' last dimension in fp32 and averaged over the positions, those of
``attention_mask`` when the logits are per token (see :func:`kl_divergence`).

Passes per step, and where they stop short of the parameters:

- R3F: the clean forward, one forward at ``e + noise``, one backward of ``loss + weight * sym KL``.
- VAT: the clean forward; ``power_iterations`` forwards at ``e + r``, each with a backward to r alone
  (``torch.autograd.grad``: no parameter gradient is computed); one forward at ``e + r_adv``; one
  backward of ``loss + weight * KL``.
- SMART: as VAT, with ``steps`` ascent passes and a symmetric KL; with ``proximal_weight`` one more forward
  before the clean one, without gradients (the momentum teacher's).

The clean forward is the task loss's own: a step costs the plain step plus the passes above, and nothing
that grows with the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..distributed import DataParallelBinding, data_parallel_wrapper
from ..errors import MissingGradientError
from ..targets import RowGradientHooks, lookup_scale, on_output, subscribe
from ..targets.row_gradients import prepare_dense_gradient
from ._common import (
    BackwardFn,
    CarriedState,
    OutputGradientPasses,
    SkipCounter,
    check_emb_name,
    check_epsilon,
    check_flag,
    plain_backward,
)
from ._finite import FiniteGuard, all_finite
from .freelb import _word_embedding

OutputClosure = Callable[[], object]


def random_like(kind: Literal["normal", "uniform"], ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """fp32 noise of ``output``'s shape (B x T x d) from the global RNG: N(0, 1), or U(-1, 1). Every random
    draw of the three methods goes through here (``ids``, B x T, unused: a test replaces this function with
    noise that depends on the ids alone, to compare a DDP rank's half batch with one process's whole)."""
    noise = torch.empty(output.shape, device=output.device)
    return noise.normal_() if kind == "normal" else noise.uniform_(-1, 1)


Norm = Literal["l2", "linf"]


def loss_and_logits(output: object) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The task loss (or None) and the logits of what a closure returned.

    Accepted: a Hugging Face ``ModelOutput`` or any mapping with ``"logits"`` (and ``"loss"`` where there is
    one); a pair ``(loss, outputs)`` as ``Trainer.compute_loss(..., return_outputs=True)`` gives it, with
    outputs such a mapping or the logits tensor; or the logits tensor alone (no task loss: the term alone is
    trained, as for unlabeled data). Logits are B x C or B x T x C.
    """
    loss: object = None
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
        loss, output = output
    if isinstance(output, Mapping):
        if "logits" not in output:
            keys = ", ".join(repr(k) for k in output.keys())
            raise TypeError(
                f"the closure returned a mapping without 'logits' (keys: {keys}): the divergence needs the model's "
                "logits; return the model's output (e.g. model(**batch)) or (loss, logits)."
            )
        loss = output.get("loss") if loss is None else loss
        output = output["logits"]
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        found = (
            f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        )
        raise TypeError(
            f"the closure returned {found}, and VAT, SMART and R3F need the logits (B x C or B x T x C) to compare "
            "the outputs under the perturbation: return the model's output (model(**batch), a ModelOutput with "
            ".logits and .loss), or (loss, logits), or the logits alone."
        )
    if loss is not None and (not isinstance(loss, torch.Tensor) or loss.numel() != 1):
        raise TypeError(f"the closure's loss must be a scalar tensor, found {type(loss).__name__}.")
    return loss, output


def kl_divergence(
    p_logits: torch.Tensor, q_logits: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p || q) over the last dimension, in fp32, averaged over the positions (every dimension but the last).

    Args:
        p_logits, q_logits: B x C or B x T x C, the same shape.
        attention_mask: B x T (0/1), for B x T x C logits: the positions averaged over; None: all of them.

    Returns a 0-dim fp32 tensor: ``sum_c p_c (log p_c - log q_c)``, the mean over the (masked) positions.
    """
    return kl_of_log_probabilities(log_probabilities(p_logits), log_probabilities(q_logits), attention_mask)


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the last dimension (B x C or B x T x C). The methods take it once per logits tensor
    of a step and share it between the divergences that read it: over a causal LM's B x T x V logits it is the
    term's largest cost."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_of_log_probabilities(
    log_p: torch.Tensor, log_q: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`kl_divergence` from the two sides' :func:`log_probabilities`."""
    return _mean_over_positions((log_p.exp() * (log_p - log_q)).sum(-1), attention_mask)


def symmetric_kl_of_log_probabilities(
    log_p: torch.Tensor, log_q: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(p || q) + KL(q || p)`` as one sum, ``sum_c (p_c - q_c) (log p_c - log q_c)`` averaged over the
    positions as :func:`kl_of_log_probabilities`: the two divergences' terms share the log difference, so the
    sum takes about half their ops, forward and backward (equal to their sum up to rounding)."""
    return _mean_over_positions(((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1), attention_mask)


def _mean_over_positions(per_position: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of a divergence per position (B or B x T) over the positions: all of them, or ``attention_mask``'s
    (B x T, for per-token divergences)."""
    if attention_mask is None or per_position.dim() != attention_mask.dim():
        return per_position.mean()
    mask = attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


class _Consistency(CarriedState):
    """What VAT, SMART and R3F share: the delta hook, the closure's outputs, the combined backward."""

    method = ""

    def __init__(self, model: nn.Module, weight: float, emb_name: str | None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.method} needs the nn.Module being trained, found {type(model).__name__}.")
        self.model = model
        self.weight = check_epsilon(weight, "weight")
        self.emb_name = check_emb_name(emb_name)
        table = _word_embedding(model, emb_name, self.method)
        self.name, self.modules = table.name, [m for _, m in table.modules]
        self._table = table.weight
        self._data_parallel = DataParallelBinding(model)
        self._skipped = SkipCounter()
        self._guard = FiniteGuard(model, self._skipped)  # the combined backward: non-finite gives .grad nothing
        self._inner_passes = OutputGradientPasses(model, f"{self.method}'s ascent")  # VAT's and SMART's
        # Per-pass state, set only inside step().
        self._deltas: list[torch.Tensor] = []  # fp32, one per lookup, B x T x d; empty: drawn at the next lookups
        self._draw: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None  # while perturbing
        self._lookups = 0
        self._active = False  # a perturbed pass is running
        self._probe = False  # its deltas are leaves whose gradient the pass takes
        self._mask: torch.Tensor | None = None
        self._decoder_mask: torch.Tensor | None = None
        # T5, BART: the logits are the decoder's positions, the first lookup the encoder's.
        self._encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._handles = [subscribe(m, self._on_lookup) for m in self.modules]
        self._row_gradients = RowGradientHooks(model)

    def bind_data_parallel(self, model: nn.Module) -> None:
        """Use the DDP wrapper or DeepSpeed engine of ``model``, made after this object was built (its inner
        passes run under ``no_sync()``, or outside the engine's backward hooks)."""
        self._data_parallel.bind(data_parallel_wrapper(model))

    @property
    def skipped_steps(self) -> int:
        """Steps whose ascent gradient (VAT, SMART) held NaN/Inf (the perturbation then left as it was, see the
        class), or whose combined loss or gradient was not finite (every ``.grad`` then zeroed, the NaN rule of
        ``fastadv.methods._finite``); each counted once. Reading it syncs."""
        return int(self._skipped)

    def remove_hooks(self) -> None:
        """Remove the forward hooks from the embedding; step() then raises."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._row_gradients.remove()

    def step(
        self,
        closure: OutputClosure,
        backward: BackwardFn | None = None,
        attention_mask: torch.Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        enabled: bool = True,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step's passes; the gradient of ``loss + weight * term`` accumulates in ``.grad``, the optimizer
        step is yours.

        Args:
            closure: one forward pass of the model on the batch, returning its output (a ModelOutput with
                ``.logits`` and ``.loss``, ``(loss, logits)``, or the logits alone: see
                :func:`loss_and_logits`); called once per pass, on the same batch each time.
            backward: backpropagates a loss, default ``loss.backward()``; e.g. ``accelerator.backward`` or
                ``lambda loss: scaler.scale(loss).backward()``.
            attention_mask: B x T, 0/1: the positions the divergence averages over (per-token logits) and, for
                VAT, the positions its perturbation lives on (of the first lookup: an encoder-decoder's encoder).
            decoder_attention_mask: for an encoder-decoder model (T5, BART), B x T_dec, 0/1: the decoder's
                positions, which its logits have: the divergence averages over them, and VAT's perturbation of
                the decoder's lookup lives on them. The batch's ``decoder_attention_mask``, or ``labels != -100``.
                Required there with ``attention_mask`` (the encoder's mask does not fit the decoder's positions).
            scaler: under fp16 autocast, the GradScaler: the inner passes (VAT, SMART) then scale their
                divergence so that small gradients do not underflow; the direction is the same.
            enabled: False: a plain step (one forward, one backward of the task loss), for a warm-up before
                the adversary starts.

        Returns:
            The task loss, detached (the term alone when the closure gives no loss).
        """
        if not self._handles:
            raise RuntimeError(
                f"{self.method}'s hooks were removed by remove_hooks(): create a new {self.method} to train with it."
            )
        for name, given in (("attention_mask", attention_mask), ("decoder_attention_mask", decoder_attention_mask)):
            if given is not None and not isinstance(given, torch.Tensor):
                raise TypeError(f"{name} must be a B x T tensor of 0/1 (or None), found {type(given).__name__}.")
        backward = backward or plain_backward
        self._data_parallel.check_knows_engine([self._table], f"'{self.name}'")  # a bare model under DeepSpeed
        if not check_flag(enabled, "enabled"):
            loss, _ = loss_and_logits(closure())
            if loss is None:
                raise TypeError(
                    f"{self.method}.step(enabled=False) runs a plain step on the task loss, and the closure gave "
                    "none: return the model's output with its loss (pass labels), or (loss, logits)."
                )
            backward(loss)
            return loss.detach()
        self._mask, self._decoder_mask = attention_mask, decoder_attention_mask
        self._skipped.begin_step()
        # Armed before the forwards: it notes an fp16 lookup there (its overflows are the scaler's to see). The
        # inner passes' gradients go to the deltas alone and pass no parameter's AccumulateGrad.
        self._guard.arm()
        # The step's one backward runs through the clean and the perturbed lookups: into a dense .grad each adds
        # its rows, where torch would make a V x d gradient for each and their sum.
        prepared = [] if self._data_parallel.deepspeed else [prepare_dense_gradient(m) for m in self.modules]
        try:
            before = self._before_clean_pass(closure)
            loss, clean = loss_and_logits(closure())
            if clean.shape[-1] < 2:
                raise ValueError(
                    f"{self.method} compares the model's output distributions (a KL divergence over the logits' last "
                    f"dimension), and the logits have shape {tuple(clean.shape)}: one output (a regression head, "
                    "num_labels=1), where the divergence is zero and the term would add nothing at 2-4x the step's "
                    "cost. fastadv has no regression form of the term yet (SMART's paper uses the squared "
                    "difference): train a regression head with FGM, PGD, FreeLB or the gradient penalty."
                )
            try:
                term = self._term(closure, clean, scaler)
                extra = self._extra_term(before, clean)
            finally:
                self._mask, self._decoder_mask, self._deltas, self._draw = None, None, [], None
            term_total = self.weight * term if extra is None else self.weight * term + extra
            total = term_total if loss is None else loss + term_total
            self._guard.loss(total)  # not finite: the step gives .grad nothing, and is counted
            backward(total)
        except BaseException:
            for weight in prepared:  # a failed step leaves .grad as it found it
                if weight is not None:
                    weight.grad = None
            raise
        finally:
            self._guard.disarm()
        return (term if loss is None else loss).detach()

    def _term(self, closure: OutputClosure, clean: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        raise NotImplementedError

    def _before_clean_pass(self, closure: OutputClosure) -> torch.Tensor | None:
        """A pass a subclass runs before the clean forward (SMART's teacher); its result goes to _extra_term."""
        return None

    def _extra_term(self, before: torch.Tensor | None, clean: torch.Tensor) -> torch.Tensor | None:
        """A second term, already weighted, added to the loss (SMART's proximal point); None: none."""
        return None

    # ------------------------------------------------------------ passes

    def _perturbed_logits(
        self,
        closure: OutputClosure,
        draw: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None,
        probe: bool = False,
    ) -> torch.Tensor:
        """The logits of a forward at ``e + delta``: ``draw(ids, output, index)`` makes each lookup's delta at
        the step's first perturbed pass; later passes use ``self._deltas`` as set between them. ``probe``: the
        deltas are made leaves that require grad (an inner pass takes the gradient to them)."""
        self._lookups, self._draw, self._probe = 0, draw if not self._deltas else None, probe
        self._active = True
        try:
            _, logits = loss_and_logits(closure())
        finally:
            self._active = False
        if self._lookups == 0:
            raise MissingGradientError(
                f"closure() never looked up '{self.name}', so the perturbation never reached the forward pass: "
                f"the closure must run the model's forward pass on the batch (create {self.method} on the model "
                "the closure runs, and pass emb_name= if the input embedding is another module)."
            )
        if self._lookups != len(self._deltas):
            raise RuntimeError(
                f"closure() looked up '{self.name}' {self._lookups} times, the first perturbed pass of this step "
                f"{len(self._deltas)} times: the closure must run the same forward pass every time."
            )
        return logits

    def _inner_pass(
        self, closure: OutputClosure, draw, clean_log_p: torch.Tensor, mask: torch.Tensor | None, scaler
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """A forward at ``e + delta`` and the gradient of KL(p_clean || p_delta) to each lookup's delta alone
        (``clean_log_p``: the clean logits' log-probabilities, detached; zeros where it does not reach), and
        whether all are finite (0-dim bool). No parameter gradient: ``torch.autograd.grad`` to the deltas, or
        under reentrant checkpointing a backward() whose parameter gradients are dropped
        (:class:`OutputGradientPasses`)."""

        def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
            logits = self._perturbed_logits(closure, draw, probe=True)  # a second run reuses the drawn deltas
            divergence = kl_of_log_probabilities(clean_log_p, log_probabilities(logits), mask)
            return (divergence if scaler is None else scaler.scale(divergence)), self._deltas

        with self._data_parallel.output_gradient_pass():  # DDP: this forward arms no all-reduce
            grads = self._inner_passes.gradients(run)
        grads = [torch.zeros_like(d) if g is None else g.float() for d, g in zip(self._deltas, grads, strict=True)]
        finite = all_finite(grads)
        self._skipped.merge_into_last(~finite)  # one count per step
        return grads, finite

    def _mask_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        """B x T: the positions of per-token logits (B x T x C) the divergence averages over; None: all of them
        (or B x C logits)."""
        if logits.dim() != 3:
            return None
        if self._decoder_mask is not None:
            mask, name = self._decoder_mask, "decoder_attention_mask"
        elif self._mask is not None and self._encoder_decoder:
            raise ValueError(
                f"{self.method} averages its divergence over the logits' positions, which are the decoder's on this "
                f"encoder-decoder model (logits {tuple(logits.shape)}), and attention_mask is the encoder's: pass "
                "decoder_attention_mask= too (the batch's decoder_attention_mask, or labels != -100)."
            )
        else:
            mask, name = self._mask, "attention_mask"
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"{name} has shape {tuple(mask.shape)}, the logits {tuple(logits.shape)}: pass the batch's B x T "
                f"{name}" + (" (the decoder's positions)." if name != "attention_mask" else ".")
            )
        return mask.to(logits.device)

    def _on_lookup(self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        index, self._lookups = self._lookups, self._lookups + 1
        if self._draw is not None:
            if ids.dim() != 2:
                raise ValueError(
                    f"{self.method} perturbs a batch of token sequences, ids of shape B x T, but '{self.name}' was "
                    f"looked up with ids of shape {tuple(ids.shape)}: flatten the batch to B x T first."
                )
            if index == 0 and self._mask is not None and tuple(self._mask.shape) != tuple(ids.shape):
                raise ValueError(  # whatever the method makes of it (R3F and SMART draw on every position)
                    f"attention_mask has shape {tuple(self._mask.shape)}, the ids looked up in '{self.name}' have "
                    f"shape {tuple(ids.shape)}: pass the batch's B x T attention mask."
                )
            self._deltas.append(self._draw(ids.detach(), output, index))
        elif index >= len(self._deltas) or self._deltas[index].shape != output.shape:
            raise RuntimeError(
                f"closure() looked up '{self.name}' differently from the first perturbed pass of this step (lookup "
                f"{index + 1}, output shape {tuple(output.shape)}): the closure must run the same batch every time."
            )
        delta = self._deltas[index].requires_grad_() if self._probe else self._deltas[index]
        return output + on_output(delta, lookup_scale(module, ids.detach(), output)).to(output.dtype)

    def _positions(self, ids: torch.Tensor, module_index: int) -> torch.Tensor:
        """B x T x 1, fp32: the positions a perturbation lives on: the first lookup's, the attention mask; the
        second's, an encoder-decoder's decoder lookup, the decoder's mask; else the non-padding ids, else all."""
        given = {0: ("attention_mask", self._mask), 1: ("decoder_attention_mask", self._decoder_mask)}
        name, mask = given.get(module_index, ("", None))
        if module_index == 1 and not self._encoder_decoder:
            mask = None
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(mask.shape)}, the ids looked up in '{self.name}' have shape "
                    f"{tuple(ids.shape)}: pass the batch's B x T {name}."
                )
        else:
            padding_idx = getattr(self.modules[0], "padding_idx", None)
            mask = ids != padding_idx if padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        return mask.to(device=ids.device, dtype=torch.float32).unsqueeze(-1)


def _sequence_unit(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * x`` divided by its L2 norm per sequence (over T x d); a zero sequence stays zero."""
    x = x * mask
    norm = torch.linalg.vector_norm(x.flatten(1), dim=1).view(-1, *([1] * (x.dim() - 1)))
    return x / norm.clamp(min=1e-12)


class R3F(_Consistency):
    """R3F (Aghajanyan et al., ICLR 2021): noise on the embedding, a symmetric KL of the outputs added to the loss.

    Per step: noise from N(0, epsilon^2) (``noise="normal"``) or U(-epsilon, epsilon) (``"uniform"``, fairseq's
    default) on every position of the raw lookup (B x T x d, fp32, drawn at the lookup); the loss is
    ``loss + weight * (KL(p || p_noisy) + KL(p_noisy || p))``, both sides trained (fairseq
    ``examples/rxf``), each KL as :func:`kl_divergence` (mean over the positions), the two taken as one sum
    (:func:`symmetric_kl_of_log_probabilities`).

    Passes: the clean forward (the task loss's), one noisy forward, one backward of the sum: no backward
    beyond the combined loss's.

    Args:
        model: the model being trained; the hook on its input embedding is registered here.
        epsilon: the noise's scale.
        weight: lambda, the factor of the symmetric KL.
        noise: "uniform" or "normal".
        emb_name: None for the input embedding; a string for the one table whose name contains it.

    Usage::

        r3f = R3F(model, epsilon=1e-5)
        for batch in loader:
            optimizer.zero_grad()
            r3f.step(lambda: model(**batch), attention_mask=batch["attention_mask"])
            optimizer.step()
    """

    method = "R3F"

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1e-5,
        weight: float = 1.0,
        noise: Literal["uniform", "normal"] = "uniform",
        emb_name: str | None = None,
    ) -> None:
        if noise not in ("uniform", "normal"):
            raise ValueError(f"noise must be 'uniform' or 'normal', found {noise!r}.")
        self.epsilon = check_epsilon(epsilon)
        self.noise = noise
        super().__init__(model, weight, emb_name)

    def __repr__(self) -> str:
        return f"R3F(epsilon={self.epsilon}, weight={self.weight}, noise={self.noise!r}, embedding={self.name!r})"

    def _term(self, closure: OutputClosure, clean: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        noisy = self._perturbed_logits(closure, self._draw_noise)
        mask = self._mask_for(clean)
        log_p, log_q = log_probabilities(clean), log_probabilities(noisy)
        return symmetric_kl_of_log_probabilities(log_p, log_q, mask)

    def _draw_noise(self, ids: torch.Tensor, output: torch.Tensor, index: int) -> torch.Tensor:
        return random_like(self.noise, ids, output) * self.epsilon


class VAT(_Consistency):
    """Virtual adversarial training (Miyato et al., 2017) on the word-embedding output.

    Per step, with the clean logits p (the task loss's forward, held fixed in the term):

    1. d from N(0, 1) on the positions of the mask (B x T x d), r = xi * d / ||d||, the norm per sequence.
    2. ``power_iterations`` times: g = d KL(p || p(e + r)) / d r, r = xi * g / ||g|| (a forward at e + r and a
       gradient to r alone); the last g gives r_adv = epsilon * g / ||g||.
    3. The loss is ``loss + weight * KL(p || p(e + r_adv))``, p detached there (Miyato's stop-gradient).

    The mask: ``attention_mask`` given to step() (B x T) at the first lookup; else the non-padding ids; else
    every position. A g that holds NaN/Inf (an fp16 overflow) leaves r_adv at zero (the term is then zero),
    counted in :attr:`skipped_steps`.

    Passes: the clean forward, ``power_iterations`` forwards each with a backward to r alone (no parameter
    gradient), one forward at r_adv, one backward of the sum.

    Args:
        model: the model being trained.
        epsilon: the norm of r_adv per sequence.
        xi: the norm of the probe r per sequence (finite-difference size of the power iteration).
        power_iterations: K >= 1.
        weight: alpha, the factor of the KL.
        emb_name: None for the input embedding; a string for the one table whose name contains it.
    """

    method = "VAT"

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        xi: float = 1e-1,
        power_iterations: int = 1,
        weight: float = 1.0,
        emb_name: str | None = None,
    ) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.xi = check_epsilon(xi, "xi")
        self.power_iterations = _check_steps(power_iterations, "power_iterations")
        super().__init__(model, weight, emb_name)

    def __repr__(self) -> str:
        return (
            f"VAT(epsilon={self.epsilon}, xi={self.xi}, power_iterations={self.power_iterations}, "
            f"weight={self.weight}, embedding={self.name!r})"
        )

    def _term(self, closure: OutputClosure, clean: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        masks: list[torch.Tensor] = []

        def draw(ids: torch.Tensor, output: torch.Tensor, index: int) -> torch.Tensor:
            masks.append(self._positions(ids, index))
            return self.xi * _sequence_unit(random_like("normal", ids, output), masks[-1])

        mask, clean_log_p = self._mask_for(clean), log_probabilities(clean.detach())
        finite = None
        for k in range(self.power_iterations):
            grads, finite = self._inner_pass(closure, draw if k == 0 else None, clean_log_p, mask, scaler)
            size = self.epsilon if k == self.power_iterations - 1 else self.xi
            self._deltas = [
                torch.where(finite, size * _sequence_unit(g, m), 0.0) for g, m in zip(grads, masks, strict=True)
            ]
        adversarial = self._perturbed_logits(closure, None)
        return kl_of_log_probabilities(clean_log_p, log_probabilities(adversarial), mask)


class SMART(_Consistency):
    """SMART's adversarial smoothness term (Jiang et al., ACL 2020) on the word-embedding output.

    Per step, with the clean logits p:

    1. noise from N(0, noise_var^2) on every position (B x T x d), as mt-dnn and smart-pytorch draw it.
    2. ``steps`` times: g = d KL(p || p(e + noise)) / d noise (p held fixed; a gradient to noise alone), then
       the projected ascent per token: ``noise + step_size * g / ||g||`` (``norm``: l2, or linf, g / max|g|),
       projected onto the ball ``||noise|| <= epsilon`` (l2: rescaled; linf: clamped).
    3. The loss is ``loss + weight * (KL(p.detach() || p_adv) + KL(p_adv.detach() || p))``: the symmetric KL of
       the published code, each side trained through the other's fixed copy.

    4. With ``proximal_weight`` mu > 0, the Bregman proximal point of the paper (its momentum teacher):
       ``+ mu * (KL(p_teacher || p) + KL(p || p_teacher))`` on the clean inputs, the teacher's weights
       ``theta~ <- momentum * theta~ + (1 - momentum) * theta`` updated at the start of every step (so from
       the weights the last optimizer step gave; at the first step theta~ = theta and the term's gradient is
       zero), held fixed in the term.

    A g that holds NaN/Inf leaves the noise as it was, counted in :attr:`skipped_steps`.

    Passes: the clean forward, ``steps`` forwards each with a backward to the noise alone, one forward at
    the final noise, one backward of the sum; with the proximal point one more forward, without gradients
    (the teacher's: the model's trainable parameters point at the teacher's tensors for its duration and
    back after, whatever it raises). The teacher holds one copy of every trainable parameter, in its dtype
    (the word embedding's too when it is trained): the method's own memory, not fastadv's. It is refused
    under FSDP2 and DeepSpeed (sharded parameters: not tested).

    Args:
        model: the model being trained.
        epsilon: the radius of the ball the noise is projected onto, per token.
        step_size: the ascent step.
        noise_var: the scale of the random start.
        steps: ascent steps K >= 1.
        norm: "l2" or "linf", the norm of the ascent and the ball.
        weight: lambda_s, the factor of the symmetric KL.
        emb_name: None for the input embedding; a string for the one table whose name contains it.
        proximal_weight: mu, the factor of the Bregman proximal term; 0 (the default) leaves it out.
        proximal_momentum: beta in [0, 1), the teacher's momentum (the paper's 0.99).
    """

    method = "SMART"

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1e-5,
        step_size: float = 1e-3,
        noise_var: float = 1e-5,
        steps: int = 1,
        norm: Norm = "linf",
        weight: float = 1.0,
        emb_name: str | None = None,
        proximal_weight: float = 0.0,
        proximal_momentum: float = 0.99,
    ) -> None:
        if norm not in ("l2", "linf"):
            raise ValueError(f"norm must be 'l2' or 'linf', found {norm!r}.")
        self.proximal_weight = check_epsilon(proximal_weight, "proximal_weight")
        self.proximal_momentum = check_epsilon(proximal_momentum, "proximal_momentum")
        if self.proximal_momentum >= 1:
            raise ValueError(
                f"proximal_momentum must be in [0, 1) (the teacher's share of its last weights), found "
                f"{proximal_momentum}."
            )
        self._teacher: MomentumTeacher | None = None  # made at the first step with the proximal term
        self._teacher_step: bool | None = None  # step()'s teacher_step, for the step under way
        self.epsilon = check_epsilon(epsilon)
        self.step_size = check_epsilon(step_size, "step_size")
        self.noise_var = check_epsilon(noise_var, "noise_var")
        self.steps = _check_steps(steps, "steps")
        self.norm: Norm = norm
        super().__init__(model, weight, emb_name)

    def __repr__(self) -> str:
        return (
            f"SMART(epsilon={self.epsilon}, step_size={self.step_size}, noise_var={self.noise_var}, "
            f"steps={self.steps}, norm={self.norm!r}, weight={self.weight}, "
            f"proximal_weight={self.proximal_weight}, proximal_momentum={self.proximal_momentum}, "
            f"embedding={self.name!r})"
        )

    def _before_clean_pass(self, closure: OutputClosure) -> torch.Tensor | None:
        """The teacher's clean logits (B x C or B x T x C, no gradient), its weights updated first."""
        if self.proximal_weight == 0:
            return None
        moves, self._teacher_step = self._teacher_step, None
        if self._teacher is None:
            self._teacher = MomentumTeacher(self.model, self._data_parallel.deepspeed, self.method)
        elif moves or (moves is None and self._teacher.weights_moved()):
            self._teacher.update(self.proximal_momentum)
        return self._teacher.logits(closure)

    def step(
        self,
        closure: OutputClosure,
        backward: BackwardFn | None = None,
        attention_mask: torch.Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        enabled: bool = True,
        decoder_attention_mask: torch.Tensor | None = None,
        teacher_step: bool | None = None,
    ) -> torch.Tensor:
        """As :meth:`VAT.step`, and ``teacher_step`` for the proximal point's teacher, which moves once per
        optimizer step: True, the weights moved since the last step (an optimizer step ran: the teacher moves
        first); False, they did not (another micro-batch of the same optimizer step); None (the default), read
        off the trainable parameters' version counters, which every in-place write bumps (an optimizer that
        writes through ``.data`` or raw pointers, as bitsandbytes' 8-bit ones do, bumps none: pass it there).
        The Trainer mixin passes it."""
        self._teacher_step = None if teacher_step is None else check_flag(teacher_step, "teacher_step")
        try:
            return super().step(closure, backward, attention_mask, scaler, enabled, decoder_attention_mask)
        finally:
            self._teacher_step = None

    _carried = (*CarriedState._carried, "teacher")

    def state_dict(self) -> dict[str, Any]:
        """``skipped_steps``, and ``teacher``: the teacher's weights (a list of tensors, one per trainable
        parameter, in ``model.parameters()`` order; the teacher's own, as a module's state_dict() gives its
        parameters, moved by its later steps), None before the first step with the proximal term."""
        teacher = None if self._teacher is None else [w.detach() for w in self._teacher.weights]
        return {**super().state_dict(), "teacher": teacher}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Carry on from ``state``: the count of skipped steps, and the teacher's weights (it moves at the next
        step, as after the optimizer step the checkpoint followed)."""
        super().load_state_dict(state)
        weights = state["teacher"]
        if weights is None:
            self._teacher = None
            return
        if self.proximal_weight == 0:
            raise ValueError(
                "the state holds a proximal-point teacher, and this SMART has proximal_weight=0: build it with the "
                "proximal_weight it was saved with."
            )
        teacher = MomentumTeacher(self.model, self._data_parallel.deepspeed, self.method)
        shapes = [tuple(w.shape) for w in weights]
        if shapes != [tuple(p.shape) for p in teacher.params]:
            raise ValueError(
                f"the state's teacher has {len(weights)} tensors, the model {len(teacher.params)} trainable "
                "parameters, of other shapes: load it into a SMART on the model it was saved from."
            )
        with torch.no_grad():
            for mine, saved in zip(teacher.weights, weights, strict=True):
                mine.copy_(saved)
        teacher.forget_versions()  # the model's weights moved since the teacher last did (an optimizer step)
        self._teacher = teacher

    def _extra_term(self, before: torch.Tensor | None, clean: torch.Tensor) -> torch.Tensor | None:
        if before is None:
            return None
        if before.shape != clean.shape:
            raise RuntimeError(
                f"the teacher's forward gave logits of shape {tuple(before.shape)}, the clean forward "
                f"{tuple(clean.shape)}: the closure must run the same batch every time."
            )
        mask = self._mask_for(clean)
        log_teacher, log_p = log_probabilities(before), log_probabilities(clean)
        bregman = symmetric_kl_of_log_probabilities(log_teacher, log_p, mask)
        return self.proximal_weight * bregman

    def _term(self, closure: OutputClosure, clean: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        def draw(ids: torch.Tensor, output: torch.Tensor, index: int) -> torch.Tensor:
            return random_like("normal", ids, output) * self.noise_var

        mask, clean_log_p = self._mask_for(clean), log_probabilities(clean)
        fixed = clean_log_p.detach()
        for k in range(self.steps):
            grads, finite = self._inner_pass(closure, draw if k == 0 else None, fixed, mask, scaler)
            self._deltas = [
                torch.where(finite, self._ascend(d.detach(), g), d.detach())
                for d, g in zip(self._deltas, grads, strict=True)
            ]
        adversarial = log_probabilities(self._perturbed_logits(closure, None))
        return kl_of_log_probabilities(fixed, adversarial, mask) + kl_of_log_probabilities(
            adversarial.detach(), clean_log_p, mask
        )

    def _ascend(self, noise: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One projected ascent step per token (over the last dimension)."""
        order = 2 if self.norm == "l2" else math.inf
        g_norm = torch.linalg.vector_norm(grad, ord=order, dim=-1, keepdim=True).clamp(min=1e-12)
        moved = noise + self.step_size * grad / g_norm
        if self.norm == "linf":
            return moved.clamp(-self.epsilon, self.epsilon)
        m_norm = torch.linalg.vector_norm(moved, dim=-1, keepdim=True)
        return moved * torch.where(m_norm > self.epsilon, self.epsilon / m_norm.clamp(min=1e-12), 1.0)


class MomentumTeacher:
    """SMART's momentum teacher: an exponential moving average of ``model``'s trainable parameters, and the
    model's forward on it.

    One tensor per parameter that requires grad (shared, tied parameters once), in the parameter's dtype and
    device; frozen parameters are the model's own. Its forward points each trainable parameter's ``.data`` at
    the teacher's tensor and back (no copy), under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, under_deepspeed: bool, method: str) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        sharded = [p for p in self.params if type(p).__name__ == "DTensor" or hasattr(p, "ds_id")]
        if sharded or under_deepspeed:
            raise NotImplementedError(
                f"{method}'s proximal point keeps a teacher copy of the trainable parameters, which is not tested "
                "with sharded ones (FSDP2, DeepSpeed): use proximal_weight=0 there, or DDP / one process."
            )
        if not self.params:
            raise ValueError(f"{method}'s proximal point needs trainable parameters, and the model has none.")
        with torch.no_grad():
            self.weights = [p.detach().clone() for p in self.params]
        self._versions: tuple[int, ...] | None = self._read_versions()  # None: unknown (loaded)

    def _read_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def weights_moved(self) -> bool:
        """Whether a trainable parameter was written in place (an optimizer step) since the teacher was made or
        last moved; the teacher's own forward (it swaps ``.data``) writes none."""
        return self._versions != self._read_versions()

    def forget_versions(self) -> None:
        """The next :meth:`weights_moved` says True (a teacher loaded from a checkpoint)."""
        self._versions = None

    def update(self, momentum: float) -> None:
        """theta~ <- momentum * theta~ + (1 - momentum) * theta, on the device (one fused call)."""
        with torch.no_grad():
            torch._foreach_lerp_(self.weights, [p.detach() for p in self.params], 1.0 - momentum)
        self._versions = self._read_versions()

    def logits(self, closure: OutputClosure) -> torch.Tensor:
        """The closure's logits with the teacher's weights, detached; the model's own weights after, always."""
        own = [p.data for p in self.params]
        try:
            with torch.no_grad():
                for p, w in zip(self.params, self.weights, strict=True):
                    p.data = w
                _, logits = loss_and_logits(closure())
        finally:
            for p, w in zip(self.params, own, strict=True):
                p.data = w
        return logits.detach()


def _check_steps(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (forward passes per step), found {value!r}.")
    return value

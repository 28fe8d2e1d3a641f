"""FreeLB: K steps of gradient ascent on a per-position delta added to the word-embedding output."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Literal

import torch
from torch import nn

from ..distributed import DataParallelBinding, data_parallel_wrapper
from ..errors import EmbeddingNotFoundError, FastAdvWarning, MissingGradientError
from ..targets import EmbeddingTable, RowGradientHooks, lookup_scale, named_tables, on_output, subscribe
from ._common import (
    BackwardFn,
    CarriedState,
    Closure,
    SkipCounter,
    check_emb_name,
    check_epsilon,
    check_flag,
    check_loss,
    plain_backward,
    plain_step,
)
from ._finite import FiniteGuard, all_finite

FreeLBNorm = Literal["l2", "linf"]


class FreeLB(CarriedState):
    """FreeLB (Zhu et al., ICLR 2020): adversarial training with K ascent steps, their gradients accumulated.

    A perturbation ``delta`` (B x T x d, one vector per token position) is added to the output e
    (B x T x d) of the word embedding, for ids of shape B x T, in a forward hook: never through
    ``inputs_embeds``, and the weight is never written, so frozen (LoRA/PEFT) and tied (GPT-2)
    embeddings work. step() runs, as the authors' huggingface script does:

    1. delta = 0, or with ``adv_init_mag > 0`` a random start on the positions of the mask:
       l2: ``U(-1, 1) * mask * adv_init_mag / sqrt(length * d)`` per sequence; linf:
       ``U(-adv_init_mag, adv_init_mag) * mask``.
    2. For k = 1..K (``adv_steps``): a forward pass at ``e + delta`` and ``backward(loss / K)``, so the
       parameter gradients accumulate to that of the mean adversarial loss; between passes one ascent
       step ``delta += adv_lr * g / ||g||`` with g = dL/d delta and the norm (l2 or linf) taken per
       sequence, then with ``adv_max_norm > 0`` a projection (l2: rescaled per sequence to norm
       ``adv_max_norm``; linf: clamped elementwise). The optimizer step stays the caller's.

    The mask of the random start: ``attention_mask`` given to step() (B x T, 0/1) when there is one;
    else ``ids != padding_idx`` when the embedding has a padding_idx; else every position.

    A table looked up several times in one forward pass (T5's and BART's encoder and decoder share
    one) gets one delta per lookup, each run as above on its own sequences (``attention_mask`` is
    the first lookup's, the model input's; later lookups start on their non-padding positions).
    delta lives on the raw lookup ``weight[ids]``: a module that scales its lookup (Gemma's, BART's
    ``*ScaledWordEmbedding``) gets ``scale * delta`` on its output, as weight rows moved by delta
    would give.

    ``keep_clean_loss=True`` adds one clean pass (no delta) before the adversarial ones, backpropagated
    at full weight: the gradient is that of ``clean loss + mean adversarial loss``, which recovers the
    accuracy plain FreeLB loses on some tasks.

    Numbers: in fp32 each step equals the published algorithm bit for bit, dropout included (delta is
    drawn at the first lookup, after the ids are embedded and before any dropout, as the script draws
    it). Two corner cases where the script yields NaN get finite values instead: a sequence whose mask
    is empty (no random start there) and, with ``adv_max_norm``, a sequence whose delta is exactly zero
    (left as it is). For half-precision embeddings delta is kept and updated in fp32 and added in the
    output's dtype. The ascent divides by the norm of g, so a loss scale (GradScaler) does not change it;
    an ascent step whose g holds NaN/Inf (e.g. an fp16 overflow) is skipped on the device, delta kept,
    and a step whose passes end with a non-finite loss or parameter gradient gives ``.grad`` zeros (in fp16
    its gradients are left for the loss scaler, which skips the update; see ``fastadv.methods._finite``);
    a step with either is counted once in :attr:`skipped_steps`.

    Dropout: the published code also reuses the dropout masks of the first pass in the K passes (their
    modified model, ``dp_masks``). Stock transformers models cannot do that, so with dropout each pass
    draws new masks, as the plain inputs_embeds version of the algorithm does.

    Args:
        model: the model being trained; the hook on its embedding is registered here.
        adv_lr: ascent step size.
        adv_steps: K >= 1, forward/backward passes per step (K = 1 is a plain pass at the random start).
        adv_init_mag: size of the random start; 0 starts at delta = 0.
        adv_max_norm: bound of delta after each ascent step; 0 leaves it unbounded.
        norm: "l2" or "linf": the norm of the ascent, the random start and the bound.
        keep_clean_loss: add a clean pass at full weight (see above).
        emb_name: None for the input embedding (``get_input_embeddings()``, else the single
            nn.Embedding), at every module that looks its table up; a string for the one table whose
            weight's name (or a module's name for it) contains it.

    Usage::

        freelb = FreeLB(model, adv_lr=0.1, adv_steps=3)
        for batch in loader:
            optimizer.zero_grad()
            freelb.step(lambda: model(**batch).loss, attention_mask=batch["attention_mask"])
            optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        adv_lr: float = 0.1,
        adv_steps: int = 3,
        adv_init_mag: float = 0.0,
        adv_max_norm: float = 0.0,
        norm: FreeLBNorm = "l2",
        keep_clean_loss: bool = False,
        emb_name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FreeLB needs the nn.Module being trained, found {type(model).__name__}.")
        if isinstance(adv_steps, bool) or not isinstance(adv_steps, int) or adv_steps < 1:
            raise ValueError(
                f"adv_steps must be an int >= 1 (the forward/backward passes per step), found {adv_steps!r}."
            )
        if norm not in ("l2", "linf"):
            raise ValueError(f"norm must be 'l2' or 'linf', found {norm!r}.")
        self.model = model
        self.adv_lr = check_epsilon(adv_lr, "adv_lr")
        self.adv_steps = adv_steps
        self.adv_init_mag = check_epsilon(adv_init_mag, "adv_init_mag")
        if self.adv_lr == 0:
            start = "at its random start" if self.adv_init_mag > 0 else "at zero: plain training"
            warnings.warn(
                f"FreeLB adv_lr=0: delta never moves from its start, so every pass trains {start}, at "
                f"{adv_steps} passes' cost. Set adv_lr above 0, or run plain steps (freelb.step(..., enabled=False)).",
                FastAdvWarning,
                stacklevel=2,
            )
        self.adv_max_norm = check_epsilon(adv_max_norm, "adv_max_norm")
        self.norm: FreeLBNorm = norm
        self.keep_clean_loss = bool(keep_clean_loss)
        self.emb_name = check_emb_name(emb_name)
        table = _word_embedding(model, emb_name)
        self.name, self.modules = table.name, [m for _, m in table.modules]
        self._weight = table.weight
        self._data_parallel = DataParallelBinding(model)  # a DeepSpeed engine: every pass but the last accumulates
        self._skipped = SkipCounter()
        self._guard = FiniteGuard(model, self._skipped)  # the adversarial passes: non-finite gives .grad nothing
        # Per-step state, set only inside step().
        self._active = False
        self._lookups = 0  # lookups in the current pass
        self._first_pass = False  # the pass that makes the deltas
        self._mask: torch.Tensor | None = None
        self._deltas: list[torch.Tensor] = []  # fp32, B x T x d per lookup; made at the first adversarial pass
        self._handles = [subscribe(m, self._on_lookup) for m in self.modules]
        self._row_gradients = RowGradientHooks(model)  # passes after the first add the table's gradient as rows

    def bind_data_parallel(self, model: nn.Module) -> None:
        """Use the DeepSpeed engine (or DDP wrapper) of ``model``, made after this object was built: under an
        engine every pass of a step but the last runs off its accumulation boundary. Nothing else changes."""
        self._data_parallel.bind(data_parallel_wrapper(model))

    def __repr__(self) -> str:
        return (
            f"FreeLB(adv_lr={self.adv_lr}, adv_steps={self.adv_steps}, adv_init_mag={self.adv_init_mag}, "
            f"adv_max_norm={self.adv_max_norm}, norm={self.norm!r}, keep_clean_loss={self.keep_clean_loss}, "
            f"emb_name={self.emb_name!r}, embedding={self.name!r})"
        )

    def step(
        self,
        closure: Closure,
        backward: BackwardFn | None = None,
        attention_mask: torch.Tensor | None = None,
        enabled: bool = True,
    ) -> torch.Tensor:
        """The passes of one FreeLB step; the gradients accumulate in ``.grad``, the optimizer step is yours.

        Args:
            closure: runs one forward pass of the model on the batch and returns the scalar loss. It is
                called ``adv_steps`` times (once more with keep_clean_loss) and must look the embedding
                up exactly once per call, on the same ids each time.
            backward: backpropagates a loss, default ``loss.backward()``; e.g. ``accelerator.backward``
                or ``lambda loss: scaler.scale(loss).backward()``.
            attention_mask: B x T, 0/1, the positions of the random start (see the class docstring);
                used only when ``adv_init_mag > 0``.
            enabled: False: a plain step instead, one forward and one backward of the loss (a warm-up
                before the adversary starts, as ``adversary_start_step`` runs it).

        Returns:
            The loss whose gradient was accumulated, detached: the sum over the adversarial passes of
            loss / adv_steps, plus the clean loss with keep_clean_loss.
        """
        if not self._handles:
            raise RuntimeError("FreeLB's hooks were removed by remove_hooks(): create a new FreeLB to train with it.")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a B x T tensor of 0/1 (or None), found {type(attention_mask).__name__}."
            )
        backward = backward or plain_backward
        if not check_flag(enabled, "enabled"):
            return plain_step(closure, backward)
        self._data_parallel.check_knows_engine([self._weight], f"'{self.name}'")
        total: torch.Tensor | None = None
        if self.keep_clean_loss:
            loss = check_loss(closure(), "closure()")
            with self._data_parallel.accumulate_only():
                backward(loss)
            total = loss.detach()
        self._mask, self._deltas = attention_mask, []
        self._skipped.begin_step()
        self._guard.arm()
        try:
            for astep in range(self.adv_steps):
                self._lookups, self._active, self._first_pass = 0, True, astep == 0
                try:
                    loss = check_loss(closure(), "closure()")
                finally:
                    self._active = False
                if self._lookups == 0:
                    raise MissingGradientError(
                        f"closure() never looked up '{self.name}', so the perturbed embedding output never reached "
                        "the forward pass: the closure must run the model's forward pass on the batch (create "
                        "FreeLB on the model the closure runs, and pass emb_name= if the input embedding is "
                        "another module)."
                    )
                if self._lookups != len(self._deltas):
                    raise RuntimeError(
                        f"closure() looked up '{self.name}' {self._lookups} times, the first pass of this step "
                        f"{len(self._deltas)} times: the closure must run the same forward pass every time."
                    )
                loss = loss / self.adv_steps
                last = astep == self.adv_steps - 1
                self._guard.loss(loss)
                with contextlib.nullcontext() if last else self._data_parallel.accumulate_only():
                    backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
                grads = [delta.grad for delta in self._deltas]
                if all(grad is None for grad in grads):
                    raise MissingGradientError(
                        f"the output of '{self.name}' was looked up in closure() but does not reach the loss "
                        "(no gradient after backward): return a loss computed from that forward pass."
                    )
                if last:
                    break
                # Read once; the next pass uses new deltas. A lookup outside the loss keeps its delta.
                self._deltas = [
                    delta.detach() if grad is None else self._ascend(delta.detach(), grad)
                    for delta, grad in zip(self._deltas, grads, strict=True)
                ]
        finally:
            self._mask, self._deltas = None, []
            self._guard.disarm()
        assert total is not None
        return total

    @property
    def skipped_steps(self) -> int:
        """Steps with an ascent skipped (delta kept) because dL/d delta held NaN/Inf, or whose adversarial passes
        ended with a non-finite loss or gradient, every ``.grad`` then zeroed (the NaN rule,
        ``fastadv.methods._finite``); each step counted once. Reading it syncs with the device."""
        return int(self._skipped)

    def remove_hooks(self) -> None:
        """Remove the forward hooks from the embedding; step() then raises."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._row_gradients.remove()

    # ------------------------------------------------------------ hook and algorithm

    def _on_lookup(self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        index, self._lookups = self._lookups, self._lookups + 1
        if self._first_pass:  # the random start needs the lookup's shape
            self._deltas.append(self._initial_delta(ids, output, module, index))
        elif index >= len(self._deltas) or self._deltas[index].shape != output.shape:
            raise RuntimeError(
                f"closure() looked up '{self.name}' differently from the first pass of this step (lookup {index + 1}, "
                f"output shape {tuple(output.shape)}; the first pass made {len(self._deltas)} lookups of shapes "
                f"{[tuple(d.shape) for d in self._deltas]}): the closure must run the same batch every time."
            )
        delta = self._deltas[index].requires_grad_()  # a leaf: after backward its .grad is dL/d delta
        return output + on_output(delta, lookup_scale(module, ids.detach(), output)).to(output.dtype)

    def _initial_delta(self, ids: torch.Tensor, output: torch.Tensor, module: nn.Module, index: int) -> torch.Tensor:
        """delta at the first pass, fp32, the shape of ``output`` (B x T x d); draws from the RNG when random."""
        if ids.dim() != 2:
            raise ValueError(
                f"FreeLB perturbs a batch of token sequences, ids of shape B x T, but '{self.name}' was looked up "
                f"with ids of shape {tuple(ids.shape)}: flatten the batch to B x T before the embedding."
            )
        mask = self._mask if index == 0 else None  # the model input's attention mask: the first lookup's
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(self._mask.shape)}, the ids looked up in '{self.name}' have "
                f"shape {tuple(ids.shape)}: pass the batch's B x T attention mask."
            )
        if self.adv_init_mag == 0:
            return torch.zeros_like(output, dtype=torch.float32)
        mask = self._start_mask(ids, mask, module).to(device=output.device, dtype=torch.float32)
        # Same operations, in the same order, as the published code; drawn in the output's dtype as it is.
        if self.norm == "l2":
            lengths = mask.sum(1)
            delta = torch.zeros_like(output).uniform_(-1, 1) * mask.unsqueeze(2)
            dims = lengths * output.size(-1)
            mag = self.adv_init_mag / torch.sqrt(dims.clamp(min=1))  # an empty row would give 0 * inf = NaN
            delta = delta * mag.view(-1, 1, 1)
        else:
            delta = torch.zeros_like(output).uniform_(-self.adv_init_mag, self.adv_init_mag) * mask.unsqueeze(2)
        return delta.float()

    @staticmethod
    def _start_mask(ids: torch.Tensor, mask: torch.Tensor | None, module: nn.Module) -> torch.Tensor:
        if mask is not None:
            return mask
        padding_idx = getattr(module, "padding_idx", None)
        if padding_idx is not None:
            return ids != padding_idx
        return torch.ones(ids.shape, device=ids.device)

    def _ascend(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One ascent step and projection, per sequence; kept as it was when ``grad`` holds NaN/Inf."""
        flat = grad.flatten(1)  # [B, T * d]; B may be 0
        if self.norm == "l2":
            denorm = torch.linalg.vector_norm(flat, dim=1).view(-1, 1, 1).clamp(min=1e-8)
            moved = delta + self.adv_lr * grad / denorm
            if self.adv_max_norm > 0:
                delta_norm = torch.linalg.vector_norm(moved.flatten(1).float(), ord=2, dim=1)
                # The script's `max / norm * exceed + (1 - exceed)` is NaN for a zero delta (inf * 0); where()
                # gives the same bits everywhere else.
                reweights = torch.where(delta_norm > self.adv_max_norm, self.adv_max_norm / delta_norm, 1.0)
                moved = moved * reweights.view(-1, 1, 1)
        else:
            denorm = torch.linalg.vector_norm(flat, ord=math.inf, dim=1).view(-1, 1, 1).clamp(min=1e-8)
            moved = delta + self.adv_lr * grad / denorm
            if self.adv_max_norm > 0:
                moved = moved.clamp(-self.adv_max_norm, self.adv_max_norm)
        finite = all_finite([grad])
        self._skipped.merge_into_last(~finite)  # one count per step
        return torch.where(finite, moved, delta)  # on the device: no host sync


def _word_embedding(model: nn.Module, emb_name: str | None, method: str = "FreeLB") -> EmbeddingTable:
    """The one table ``method`` (FreeLB, VAT, SMART, R3F) perturbs, with the modules that look it up: the input
    embedding's, or the table ``emb_name`` names."""
    tables = named_tables(model, emb_name, method)
    if len(tables) == 1:
        return tables[0]
    found = ", ".join(f"'{t.name}'" for t in tables)
    raise EmbeddingNotFoundError(
        f"emb_name={emb_name!r} matches {len(tables)} embedding tables ({found}), and {method} perturbs the "
        "lookups of one: pass a longer substring that names only the word embedding, e.g. 'word_embeddings'."
    )

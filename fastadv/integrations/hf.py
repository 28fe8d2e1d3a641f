"""Adversarial training inside Hugging Face's ``transformers.Trainer``.

Usage::

    from fastadv import FGM
    from fastadv.integrations.hf import AdversarialTrainer

    model = AutoModelForSequenceClassification.from_pretrained(...)
    trainer = AdversarialTrainer(adversary=FGM(model), model=model, args=args, train_dataset=dataset)
    trainer.train()

Build the adversary on the object passed as ``model=``, before training: it hooks that model's
embedding. Any fastadv method works (FGM, PGD, FreeLB, GradientPenalty, VAT, SMART, R3F).
``adversary_start_step=N`` trains the first N optimizer steps plainly (one forward and backward per
micro-batch), then with the adversary.

With another Trainer class (TRL's ``SFTTrainer``, ``Seq2SeqTrainer``, ...)::

    from trl import SFTTrainer
    from fastadv.integrations.hf import adversarial_trainer

    trainer = adversarial_trainer(SFTTrainer)(adversary=FGM(model), model=model, args=sft_config, ...)

or write the class: ``class AdversarialSFTTrainer(AdversarialTrainingMixin, SFTTrainer)``.

What one step does. Trainer calls ``training_step`` once per micro-batch; the Trainer class's own
``training_step`` runs (``model.train()``, the inputs prepared, the subclass's contexts), and its one
``compute_loss`` call runs the adversary's passes, ``adversary.step(closure, backward=...)``:

- ``closure`` recomputes ``self.compute_loss(model, inputs, num_items_in_batch=...)`` on the same inputs
  (an FGM step calls it twice, PGD K + 1 times, FreeLB K times, GradientPenalty twice, VAT and SMART
  K + 2 times (SMART with its proximal point K + 3), R3F twice; for those three with
  ``return_outputs=True``: they compare the logits);
- ``backward`` divides by the number of accumulation steps when Trainer divides, averages over
  ``DataParallel`` GPUs and calls ``self.accelerator.backward``, for every pass that reaches the
  parameters: fp16's GradScaler, DDP and gradient accumulation see each pass as they see Trainer's
  single one. fastadv's methods already handle accumulated gradients.
- FreeLB gets the batch's ``attention_mask`` for its random start.

The optimizer step, clipping, scheduler, logging and saving stay Trainer's. The loss returned
(and logged) is the adversary's (the clean loss; FreeLB: the mean adversarial loss), scaled as
Trainer scales its own.

Under DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO stages 0-3) every pass goes to
``engine.backward``, the last one at the accumulation boundary where accelerate would put it and the
earlier ones off it, and ``engine.step()`` runs once after them when Trainer syncs the gradients
(accelerate's own backward would step the engine after the clean pass). The adversary is bound to the
engine and perturbs the lookups' outputs there.

Each checkpoint also holds the adversary's ``state_dict()`` (``fastadv_adversary.pt``: its skipped steps,
SMART's teacher), loaded by ``resume_from_checkpoint``; SMART's teacher moves at the first micro-batch of
each optimizer step.

Tested with transformers 5.25 and TRL 1.16. Refused with an error: LOMO/AdaLomo (they update the
weights inside ``backward``, between the passes) and SageMaker model parallelism.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled

from ..methods import FGM, PGD, R3F, SMART, VAT, Adversary, FreeLB, GradientPenalty

_ADVERSARIES = (FGM, PGD, FreeLB, GradientPenalty, VAT, SMART, R3F)
ADVERSARY_STATE_NAME = "fastadv_adversary.pt"  # the adversary's state_dict() in each Trainer checkpoint
_CONSISTENCY = (VAT, SMART, R3F)  # their closure returns the outputs: the term compares the logits


COUNTER_MAX_ELEMENTS = 64
"""The most elements a tensor attribute of the Trainer may hold to be kept from the clean pass as a counter (a
larger one is a cache or a buffer, not a count of the micro-batch)."""


def _plain_data(value: object, depth: int = 0) -> bool:
    """Numbers, strings, None, tensors of at most COUNTER_MAX_ELEMENTS elements, and lists, tuples, deques and
    dicts of them (4 levels at most: TRL's metrics are a dict of dicts of lists)."""
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() <= COUNTER_MAX_ELEMENTS
    if depth >= 4:
        return False
    if isinstance(value, (list, tuple, collections.deque)):
        return all(_plain_data(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain_data(v, depth + 1) for k, v in value.items())
    return False


def _decoder_positions(inputs: dict[str, Any]) -> torch.Tensor | None:
    """B x T_dec, an encoder-decoder batch's decoder positions: its ``decoder_attention_mask``, else where its
    labels are not -100 (Seq2SeqTrainer's collator pads them so); None without either."""
    mask = inputs.get("decoder_attention_mask")
    if mask is not None:
        return mask
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        return (labels != -100).long()
    return None


def _same_tensor_layout(now: object, clean: object) -> bool:
    return (
        isinstance(now, torch.Tensor)
        and isinstance(clean, torch.Tensor)
        and (now.shape, now.dtype, now.device) == (clean.shape, clean.dtype, clean.device)
    )


def _unchanged(now: object, clean: object) -> bool:
    """Plain data equal to ``clean``; a tensor inside a container counts as changed (comparing would sync)."""
    if type(now) is not type(clean) or isinstance(now, torch.Tensor):
        return False
    if isinstance(now, (list, tuple, collections.deque)):
        return len(now) == len(clean) and all(_unchanged(a, b) for a, b in zip(now, clean, strict=True))
    if isinstance(now, dict):
        return now.keys() == clean.keys() and all(_unchanged(now[key], clean[key]) for key in now)
    try:
        return bool(now == clean)
    except (TypeError, ValueError, RuntimeError):  # an array's elementwise ==: put it back
        return False


class AdversarialTrainingMixin:
    """What makes a ``transformers.Trainer`` (or a subclass of it) run a fastadv adversary's passes.

    Put it first among the bases, before the Trainer class it extends (``adversarial_trainer(cls)`` does that
    for you)::

        class AdversarialSFTTrainer(AdversarialTrainingMixin, SFTTrainer): ...

    Args:
        adversary: a fastadv method (FGM, PGD, FreeLB, GradientPenalty, VAT, SMART or R3F) built on the
            model this Trainer trains (the object passed as ``model=``).
        adversary_start_step: the optimizer steps (``state.global_step``) trained plainly before the
            adversary starts: each of their micro-batches is one forward and one backward. 0: from the start.
        *args, **kwargs: the Trainer class's arguments, unchanged.

    How it composes. The Trainer class's own ``training_step`` runs, with whatever it wraps around
    ``Trainer.training_step`` (TRL's SFTTrainer: its activation-offload context). ``Trainer.training_step``
    makes one forward, ``self.compute_loss``, and one backward, ``self.accelerator.backward``. This mixin
    intercepts both: that ``compute_loss`` call reaches the mixin's, which runs every pass of
    ``adversary.step`` there (each pass calling ``self.compute_loss`` again: the subclass's loss, with any
    override above the mixin, and backpropagated as Trainer would), and the backward Trainer then asks for
    is skipped (the passes ran theirs). Intercepting those two calls, rather than rewriting
    ``training_step``, keeps every subclass's step context around the passes and leaves the rest of
    Trainer's step (inputs, accumulation scaling of the logged loss) Trainer's own.

    A subclass that counts inside ``compute_loss`` (TRL: ``num_tokens``, ``mean_token_accuracy``, ``entropy``;
    axolotl: its tokens-per-second accumulators) would count each adversarial pass too. So after every pass but
    the first, the Trainer's bookkeeping is put back to what the first (clean) pass left: every attribute of
    the Trainer that holds plain data (numbers, strings, small tensors of at most
    :data:`COUNTER_MAX_ELEMENTS` elements, and lists, tuples and dicts of them), whatever its name, plus those
    named in ``clean_pass_only_state`` whatever they hold. Attributes holding objects (the model, the
    optimizer, ``state``, the accelerator) are never touched.

    An override of ``compute_loss`` above the mixin must call ``super().compute_loss`` (checked: the step
    raises otherwise).
    """

    clean_pass_only_state: tuple[str, ...] = ()
    """Attributes that ``compute_loss`` updates to count a micro-batch and that do not hold plain data (which is
    kept from the clean pass anyway, see the class): only the clean pass's updates are kept."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(AdversarialTrainingMixin):
            # Trainer's step would run first and never reach the mixin; the Trainer class's __init__ would also
            # refuse adversary=.
            raise TypeError(
                f"{cls.__name__}: put AdversarialTrainingMixin before the Trainer class among the bases, e.g. "
                "class X(AdversarialTrainingMixin, SFTTrainer), or use adversarial_trainer(SFTTrainer)."
            )

    def __init__(
        self, *args: Any, adversary: Adversary | None = None, adversary_start_step: int = 0, **kwargs: Any
    ) -> None:
        self._set_adversary(adversary, adversary_start_step)
        super().__init__(*args, **kwargs)
        self._check_trainer()

    def _set_adversary(self, adversary: Adversary | None, adversary_start_step: int) -> None:
        """The mixin's state, its arguments checked (before Trainer's __init__: nothing of Trainer's is read)."""
        name = type(self).__name__
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{name} uses AdversarialTrainingMixin without transformers.Trainer among its bases: combine it "
                "with a Trainer class, e.g. adversarial_trainer(Trainer)."
            )
        if adversary is None:
            raise TypeError(
                f"{name} needs adversary=: pass a fastadv method built on the model, e.g. "
                f"{name}(adversary=FGM(model), model=model, args=args, ...). Without one, use the Trainer class "
                "it extends."
            )
        if not isinstance(adversary, _ADVERSARIES):
            raise TypeError(
                "adversary must be a fastadv FGM, PGD, FreeLB, GradientPenalty, VAT, SMART or R3F, found "
                f"{type(adversary).__name__}."
            )
        start = adversary_start_step
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(
                "adversary_start_step must be an int >= 0 (the optimizer steps trained before the adversary starts), "
                f"found {adversary_start_step!r}."
            )
        self.adversary = adversary
        self.adversary_start_step = adversary_start_step
        self._adversarial_step_pending = False
        self._teacher_moved_at: int | None = None  # the optimizer step SMART's teacher last moved at (None: not yet)

    def _check_trainer(self) -> None:
        """What the built Trainer must allow: the adversary's passes between its forward and its optimizer step."""
        name = type(self).__name__
        if is_sagemaker_mp_enabled():
            raise NotImplementedError(
                f"{name} does not support SageMaker model parallelism: its forward-backward runs as one "
                "call, with no room for the adversary's passes. Use transformers.Trainer there."
            )
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            raise NotImplementedError(
                f"optim={self.args.optim.value!r} updates the weights inside backward, so the adversarial pass would "
                "run on weights the clean pass already changed. Choose another optimizer (e.g. optim='adamw_torch')."
            )
        self._check_adversary_model()

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The adversary's passes on one micro-batch, inside the Trainer class's own step; returns its loss.

        Args:
            model: the model to run (Trainer's wrapped model, e.g. under DDP).
            inputs: the micro-batch, e.g. ``input_ids`` and ``attention_mask`` (B x T) and ``labels``.
            num_items_in_batch: passed to ``compute_loss`` as Trainer passes it.

        Returns the loss detached, scaled as Trainer scales its own (the clean loss; FreeLB: the mean
        adversarial loss).
        """
        self._check_adversary_model()
        bind = getattr(self.adversary, "bind_data_parallel", None)
        if bind is not None:  # Trainer wraps the model in DDP after the adversary was built on it
            bind(model)
        self._adversarial_step_pending = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self._adversarial_step_pending:
                raise RuntimeError(
                    f"{type(self).__name__}.training_step never reached AdversarialTrainingMixin.compute_loss, so "
                    "the adversary did not run: a compute_loss override above the mixin must call "
                    "super().compute_loss(...)."
                )
        finally:
            self._adversarial_step_pending = False
            self.accelerator.__dict__.pop("backward", None)  # the skip, if Trainer never called it
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Inside ``training_step``: the adversary's passes (see the class); elsewhere the subclass's loss."""
        if not self._adversarial_step_pending or return_outputs:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        self._adversarial_step_pending = False  # the passes' own compute_loss calls go straight to the subclass
        passes = 0
        consistency = isinstance(self.adversary, _CONSISTENCY)
        clean_state: dict[str, Any] = {}  # the bookkeeping as the clean pass left it

        def closure() -> torch.Tensor:
            nonlocal passes
            # compute_loss pops "labels" from its dict with label smoothing or compute_loss_func: every pass
            # gets its own shallow copy.
            result = self.compute_loss(
                model, copy.copy(inputs), return_outputs=consistency, num_items_in_batch=num_items_in_batch
            )
            if consistency and not (isinstance(result, (tuple, list)) and len(result) == 2):
                found = f"a tensor of shape {tuple(result.shape)}" if torch.is_tensor(result) else type(result).__name__
                raise TypeError(
                    f"{type(self.adversary).__name__} compares the model's outputs, so {type(self).__name__} calls "
                    f"compute_loss(..., return_outputs=True), which returned {found}, not (loss, outputs): make "
                    "your compute_loss override return (loss, outputs) when return_outputs is True, as Trainer's "
                    "does (FGM, PGD, FreeLB and the gradient penalty need the loss alone)."
                )
            loss, outputs = result if consistency else (result, None)
            passes += 1
            if passes == 1:
                clean_state.update((name, copy.deepcopy(getattr(self, name))) for name in self._bookkeeping())
            else:
                self._put_back_bookkeeping(clean_state)
            if self.args.n_gpu > 1:
                loss = loss.mean()  # DataParallel returns one loss per GPU
            return (loss, outputs) if consistency else loss

        divide = not self._loss_is_scaled_for_ga(num_items_in_batch)
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

        engine = self._deepspeed_engine()

        def backward(loss: torch.Tensor) -> None:
            if engine is None:
                self.accelerator.backward(loss / steps if divide else loss)
            else:  # accelerate's backward would step the engine at the boundary, between the passes
                # Always a new tensor: the engine's forward hooked the loss itself, and that hook, firing before the
                # mark engine.backward puts on its argument, would divide by the accumulation steps again (ZeRO-0).
                engine.backward(loss / steps if divide else loss.clone(), scale_wrt_gas=False)

        with_mask = isinstance(self.adversary, (FreeLB, *_CONSISTENCY))
        step_kwargs: dict[str, Any] = {"attention_mask": inputs.get("attention_mask")} if with_mask else {}
        if consistency and getattr(getattr(self.adversary.model, "config", None), "is_encoder_decoder", False):
            step_kwargs["decoder_attention_mask"] = _decoder_positions(inputs)  # the logits' positions
        step_kwargs["enabled"] = self.state.global_step >= self.adversary_start_step
        if isinstance(self.adversary, SMART):  # its teacher moves once per optimizer step, at its first micro-batch
            step_kwargs["teacher_step"] = self.state.global_step != self._teacher_moved_at
            self._teacher_moved_at = self.state.global_step
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and isinstance(self.adversary, (PGD, GradientPenalty, *_CONSISTENCY)):
            step_kwargs["scaler"] = scaler  # their dL/de-only passes scale the loss too (fp16)
        if engine is not None:
            # The step's last pass is the boundary where accelerate would put it; the adversary runs the earlier
            # passes off it (fastadv.distributed.DataParallelBinding.accumulate_only).
            engine.set_gradient_accumulation_boundary(self.accelerator.sync_gradients)
        loss = self.adversary.step(closure, backward=backward, **step_kwargs)
        if engine is not None and self.accelerator.sync_gradients:
            engine.step()  # what accelerate's backward does at the boundary, once all the passes ran

        def skip_trainers_backward(loss: torch.Tensor, **kwargs: Any) -> None:
            del self.accelerator.backward  # back to Accelerator.backward after this one call

        # Trainer's next call is accelerator.backward on the loss returned here: every pass already ran its own.
        self.accelerator.backward = skip_trainers_backward
        return loss.detach()

    # ------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's, and the adversary's carried state (``state_dict()``: its skipped steps, SMART's teacher) in
        ``output_dir/fastadv_adversary.pt``, so that ``resume_from_checkpoint`` carries on from it."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.adversary.state_dict(), os.path.join(output_dir, ADVERSARY_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's, and the adversary's carried state where the checkpoint holds one (a checkpoint saved
        without fastadv holds none: the adversary then starts afresh, as it would have)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ADVERSARY_STATE_NAME)
        if os.path.isfile(path):
            self.adversary.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
            self._teacher_moved_at = None  # the resumed step's first micro-batch moves SMART's teacher

    # ------------------------------------------------------------ internals

    def _bookkeeping(self) -> list[str]:
        """The attributes a pass of ``compute_loss`` may count into (see the class)."""
        named = set(self.clean_pass_only_state)
        return [name for name, value in vars(self).items() if name in named or _plain_data(value)]

    def _put_back_bookkeeping(self, clean_state: dict[str, Any]) -> None:
        """Every attribute of ``_bookkeeping`` as the clean pass left it (``clean_state``, copies); one a later pass
        made is removed. A tensor is written back in place (no host sync, the same object); any other attribute
        is set to a copy of its clean value where it differs (the same object where nothing changed)."""
        for name in set(self._bookkeeping()) - set(clean_state):
            delattr(self, name)
        missing = object()
        for name, clean in clean_state.items():
            now = getattr(self, name, missing)
            if _same_tensor_layout(now, clean):
                with torch.no_grad():
                    now.copy_(clean)
            elif now is missing or not _unchanged(now, clean):
                setattr(self, name, copy.deepcopy(clean))

    def _deepspeed_engine(self) -> nn.Module | None:
        """The DeepSpeed engine accelerate trains with, or None without DeepSpeed."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return None
        return self.accelerator.deepspeed_engine_wrapped.engine

    def _loss_is_scaled_for_ga(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Whether compute_loss's loss is already normalized over the accumulated batch (Trainer's own rule)."""
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def _check_adversary_model(self) -> None:
        """The adversary's hooks must sit on the model Trainer runs, else they never see its forward passes."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if any(self.adversary.model is m for m in (self.model, unwrapped, unwrap_peft_model(unwrapped))):
            return
        hint = (
            " With model_init=, Trainer creates the model itself, so no adversary can be built on it: pass model=."
            if self.model_init is not None
            else ""
        )
        raise ValueError(
            f"the adversary was built on a {type(self.adversary.model).__name__} that is not the model this Trainer "
            f"trains (a {type(self.model).__name__}): its hooks would never see the Trainer's forward passes. Build "
            f"it on the object passed as model=, e.g. {type(self).__name__}(adversary=FGM(model), model=model, ...)."
            + hint
        )


class AdversarialTrainer(AdversarialTrainingMixin, Trainer):
    """A ``transformers.Trainer`` whose training step runs a fastadv adversary's passes.

    Args:
        adversary: a fastadv method (FGM, PGD, FreeLB or GradientPenalty) built on the model this
            Trainer trains (the object passed as ``model=``).
        *args, **kwargs: ``transformers.Trainer``'s arguments, unchanged.

    Each micro-batch's inputs (a dict of B x T tensors, labels included) go to ``adversary.step``
    through a closure that calls ``compute_loss``; override ``compute_loss`` as with Trainer (calling
    ``super().compute_loss`` for the model's loss).
    """


def adversarial_trainer(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` with ``AdversarialTrainingMixin`` in front: ``Adversarial<Name>``, one class per argument.

    Args:
        trainer_class: ``transformers.Trainer`` or a subclass of it (TRL's ``SFTTrainer``, ``Seq2SeqTrainer``).

    Returns ``AdversarialTrainer`` for ``Trainer``, and the class itself if it already has the mixin.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        found = trainer_class.__name__ if isinstance(trainer_class, type) else type(trainer_class).__name__
        what = "the class" if isinstance(trainer_class, type) else "an instance of"
        raise TypeError(f"adversarial_trainer takes transformers.Trainer or a subclass of it, found {what} {found}.")
    if trainer_class is Trainer:
        return AdversarialTrainer
    if issubclass(trainer_class, AdversarialTrainingMixin):
        return trainer_class
    return _with_mixin(trainer_class)


@functools.cache  # one class per Trainer class: isinstance checks and pickled references stay stable
def _with_mixin(trainer_class: type[Trainer]) -> type[Trainer]:
    name = f"Adversarial{trainer_class.__name__}"
    return type(
        name,
        (AdversarialTrainingMixin, trainer_class),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{trainer_class.__name__} with AdversarialTrainingMixin.",
        },
    )


def make_adversarial(trainer: Trainer, adversary: Adversary, adversary_start_step: int = 0) -> Trainer:
    """Make a Trainer that is already built (by a framework: LLaMA-Factory, axolotl, TRL's CLI) run ``adversary``'s
    passes: its class becomes ``adversarial_trainer(type(trainer))``, with the checks and the warm-up of
    ``AdversarialTrainingMixin``. Call it before ``trainer.train()``.

    Args:
        trainer: a ``transformers.Trainer`` instance, of any subclass.
        adversary: a fastadv method built on the model the Trainer trains (``trainer.model``), e.g.
            ``FGM(trainer.model)`` or ``build_adversary(trainer.model, "pgd", epsilon=1.0)``.
        adversary_start_step: the optimizer steps trained plainly before the adversary starts.

    Returns the same object, now adversarial. On a refusal (an adversary on another model, LOMO, ...) it is left
    as it was.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"make_adversarial takes a transformers.Trainer instance, found {type(trainer).__name__}.")
    if isinstance(trainer, AdversarialTrainingMixin):
        raise ValueError(
            f"the {type(trainer).__name__} is adversarial already (its adversary: {trainer.adversary!r}): one "
            "adversary per Trainer."
        )
    built, attributes = type(trainer), set(vars(trainer))
    trainer.__class__ = adversarial_trainer(built)
    try:
        trainer._set_adversary(adversary, adversary_start_step)
        trainer._check_trainer()
    except BaseException:
        trainer.__class__ = built
        for name in set(vars(trainer)) - attributes:  # what _set_adversary set
            del trainer.__dict__[name]
        raise
    return trainer

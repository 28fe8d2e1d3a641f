"""Adversarial training inside Hugging Face's ``transformers.Trainer``.

Usage::

    from fastadv import FGM
    from fastadv.integrations.hf import AdversarialTrainer

    model = AutoModelForSequenceClassification.from_pretrained(...)
    trainer = AdversarialTrainer(adversary=FGM(model), model=model, args=args, train_dataset=dataset)
    trainer.train()

Build the adversary on the object passed as ``model=``, before training: it hooks that model's
embedding. Any fastadv method works (FGM, PGD, FreeLB, GradientPenalty).

What one step does. Trainer calls ``training_step`` once per micro-batch; this one does what
``Trainer.training_step`` does (``model.train()``, the inputs prepared, the loss from
``self.compute_loss(model, inputs, num_items_in_batch=...)``, divided by the number of
accumulation steps when Trainer divides it, averaged over ``DataParallel`` GPUs), except that the
forward and backward passes run inside ``adversary.step(closure, backward=...)``:

- ``closure`` recomputes ``compute_loss`` on the same inputs (an FGM step calls it twice, PGD
  K + 1 times, FreeLB K times, GradientPenalty twice);
- ``backward`` applies Trainer's scaling and calls ``self.accelerator.backward``, for every pass
  that reaches the parameters: fp16's GradScaler, DDP and gradient accumulation see each pass as
  they see Trainer's single one. fastadv's methods already handle accumulated gradients.
- FreeLB gets the batch's ``attention_mask`` for its random start.

The optimizer step, clipping, scheduler, logging and saving stay Trainer's. The loss returned
(and logged) is the adversary's (the clean loss; FreeLB: the mean adversarial loss), scaled as
Trainer scales its own.

It mirrors ``Trainer.training_step`` of transformers 5 (tested with 5.23). Refused with an error:
DeepSpeed (accelerate steps the optimizer inside ``backward`` at the accumulation boundary, so the
weights would change between the clean and the adversarial pass), LOMO/AdaLomo (they update the
weights inside ``backward`` too) and SageMaker model parallelism.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import DistributedType
from accelerate.utils.memory import clear_device_cache
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled

from ..methods import FGM, PGD, Adversary, FreeLB, GradientPenalty

_ADVERSARIES = (FGM, PGD, FreeLB, GradientPenalty)


class AdversarialTrainingMixin:
    """What makes a ``transformers.Trainer`` run a fastadv adversary's passes in its training step.

    Args:
        adversary: a fastadv method (FGM, PGD, FreeLB or GradientPenalty) built on the model this
            Trainer trains (the object passed as ``model=``).
        *args, **kwargs: ``transformers.Trainer``'s arguments, unchanged.

    Each micro-batch's inputs (a dict of B x T tensors, labels included) go to ``adversary.step``
    through a closure that calls ``compute_loss``; override ``compute_loss`` as with Trainer.
    """

    def __init__(self, *args: Any, adversary: Adversary | None = None, **kwargs: Any) -> None:
        if adversary is None:
            raise TypeError(
                "AdversarialTrainer needs adversary=: pass a fastadv method built on the model, e.g. "
                "AdversarialTrainer(adversary=FGM(model), model=model, args=args, ...). Without one, use "
                "transformers.Trainer."
            )
        if not isinstance(adversary, _ADVERSARIES):
            raise TypeError(
                f"adversary must be a fastadv FGM, PGD, FreeLB or GradientPenalty, found {type(adversary).__name__}."
            )
        self.adversary = adversary
        super().__init__(*args, **kwargs)
        if is_sagemaker_mp_enabled():
            raise NotImplementedError(
                "AdversarialTrainer does not support SageMaker model parallelism: its forward-backward runs as one "
                "call, with no room for the adversary's passes. Use transformers.Trainer there."
            )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError(
                "AdversarialTrainer does not support DeepSpeed yet: accelerate runs DeepSpeed's optimizer step inside "
                "backward at the accumulation boundary, so the weights would change between the clean and the "
                "adversarial pass. Use DDP or FSDP (accelerate config) instead."
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
        """The adversary's passes on one micro-batch; returns the loss detached, scaled as Trainer's.

        Args:
            model: the model to run (Trainer's wrapped model, e.g. under DDP).
            inputs: the micro-batch, e.g. ``input_ids`` and ``attention_mask`` (B x T) and ``labels``.
            num_items_in_batch: passed to ``compute_loss`` as Trainer passes it.
        """
        self._check_adversary_model()
        bind = getattr(self.adversary, "bind_data_parallel", None)
        if bind is not None:  # Trainer wraps the model in DDP after the adversary was built on it
            bind(model)
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            if (
                self.args.torch_empty_cache_steps is not None
                and self.state.global_step % self.args.torch_empty_cache_steps == 0
            ):
                clear_device_cache()

            def closure() -> torch.Tensor:
                # compute_loss pops "labels" from its dict with label smoothing or compute_loss_func: every pass
                # gets its own shallow copy.
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, copy.copy(inputs), num_items_in_batch=num_items_in_batch)
                if self.args.n_gpu > 1:
                    loss = loss.mean()  # DataParallel returns one loss per GPU
                return loss

            divide = not self._loss_is_scaled_for_ga(num_items_in_batch)
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

            def scaled(loss: torch.Tensor) -> torch.Tensor:
                return loss / steps if divide else loss

            def backward(loss: torch.Tensor) -> None:
                self.accelerator.backward(scaled(loss))

            step_kwargs = {"attention_mask": inputs.get("attention_mask")} if isinstance(self.adversary, FreeLB) else {}
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and isinstance(self.adversary, (PGD, GradientPenalty)):
                step_kwargs["scaler"] = scaler  # their dL/de-only passes scale the loss too (fp16)
            loss = self.adversary.step(closure, backward=backward, **step_kwargs)
            return scaled(loss)

    # ------------------------------------------------------------ internals

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
            "it on the object passed as model=, e.g. AdversarialTrainer(adversary=FGM(model), model=model, ...)." + hint
        )


class AdversarialTrainer(AdversarialTrainingMixin, Trainer):
    """A ``transformers.Trainer`` whose training step runs a fastadv adversary's passes.

    Args:
        adversary: a fastadv method (FGM, PGD, FreeLB or GradientPenalty) built on the model this
            Trainer trains (the object passed as ``model=``).
        *args, **kwargs: ``transformers.Trainer``'s arguments, unchanged.
    """

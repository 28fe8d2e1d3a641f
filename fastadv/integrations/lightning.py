"""Adversarial training in a Lightning module, with manual optimization.

The adversary runs several backward passes per step, which Lightning's automatic optimization
(one loss returned, one backward) cannot express. Set ``self.automatic_optimization = False`` in
the module's ``__init__`` and call :func:`adversarial_training_step` in ``training_step``::

    from fastadv import FGM
    from fastadv.integrations.lightning import adversarial_training_step

    class Classifier(lightning.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.automatic_optimization = False
            self.model = model
            self.fgm = FGM(model)

        def training_step(self, batch, batch_idx):
            loss = adversarial_training_step(self, self.fgm, lambda: self.model(**batch).loss)
            self.log("train_loss", loss)
            return loss

Every backward goes through ``module.manual_backward`` (so Lightning's precision plugin scales
it, e.g. "16-mixed"), and the optimizer step through Lightning's optimizer wrapper. Lightning
itself is not imported here: the helper only calls the module's methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..methods import R3F, SMART, VAT, Adversary, FreeLB

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


def adversarial_training_step(
    module: LightningModule,
    adversary: Adversary,
    closure: Callable[[], torch.Tensor],
    optimizer: Any | None = None,
    attention_mask: torch.Tensor | None = None,
    adversary_start_step: int = 0,
) -> torch.Tensor:
    """One optimizer step of adversarial training: zero_grad, the adversary's passes, optimizer.step().

    Args:
        module: the LightningModule being trained, with ``automatic_optimization = False``.
        adversary: a fastadv method (FGM, PGD, FreeLB, GradientPenalty, VAT, SMART, R3F) built on the
            model the closure runs.
        closure: runs the forward pass on the batch and returns the scalar loss (VAT, SMART, R3F: the
            model's output, with its logits); called once per pass (twice for FGM).
        optimizer: the optimizer to step; default ``module.optimizers()`` (when there is one).
        attention_mask: FreeLB, VAT, SMART, R3F: the batch's B x T mask (FreeLB: of its random start).
        adversary_start_step: the optimizer steps (``module.global_step``) trained plainly before the
            adversary starts (one forward and backward each). 0: from the start.

    Returns:
        The adversary's loss, detached (the clean loss; FreeLB: the mean adversarial loss).
    """
    if getattr(module, "automatic_optimization", True):
        raise RuntimeError(
            f"adversarial_training_step needs manual optimization, and {type(module).__name__} uses automatic "
            "optimization: set self.automatic_optimization = False in its __init__."
        )
    if attention_mask is not None and not isinstance(adversary, (FreeLB, VAT, SMART, R3F)):
        raise ValueError(
            f"attention_mask= is for FreeLB, VAT, SMART and R3F; {type(adversary).__name__} takes none: leave it out."
        )
    if isinstance(adversary_start_step, bool) or not isinstance(adversary_start_step, int) or adversary_start_step < 0:
        raise ValueError(f"adversary_start_step must be an int >= 0, found {adversary_start_step!r}.")
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, (list, tuple)):
            raise ValueError(
                f"{type(module).__name__} has {len(optimizer)} optimizers: pass the one to step as optimizer=."
            )
    step_kwargs: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    step_kwargs["enabled"] = module.global_step >= adversary_start_step
    optimizer.zero_grad()
    loss = adversary.step(closure, backward=module.manual_backward, **step_kwargs)
    optimizer.step()
    return loss

"""A Trainer made adversarial by keys of a framework's config (axolotl's YAML: see
:mod:`fastadv.integrations.axolotl`), as one would write them::

    adversarial_method: pgd          # fgm, fgsm, pgd, freelb, gradient_penalty, vat, smart, r3f
    adversarial_epsilon: 1.0         # the method's epsilon (the gradient penalty's too)
    adversarial_options:             # any other keyword of the method
      alpha: 0.3
      steps: 3
    adversarial_start_step: 100      # optimizer steps trained plainly first

A config without ``adversarial_method`` trains plainly; the other keys without it are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from transformers import Trainer

from ..methods import build_adversary
from .hf import make_adversarial

KEYS = ("adversarial_method", "adversarial_epsilon", "adversarial_options", "adversarial_start_step")
logger = logging.getLogger("fastadv")


def _read(config: object, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def make_adversarial_from_config(config: object, trainer: Trainer) -> Trainer | None:
    """Make ``trainer`` adversarial as ``config`` says (a mapping or an object with the :data:`KEYS` as
    attributes, e.g. axolotl's ``cfg``); returns it, or None when the config names no method.

    The adversary is ``build_adversary(trainer.model, adversarial_method, epsilon=adversarial_epsilon,
    **adversarial_options)``, on the model the Trainer trains, from ``adversarial_start_step``.
    """
    method = _read(config, "adversarial_method")
    given = [key for key in KEYS[1:] if _read(config, key) is not None]
    if method is None:
        if given:
            raise ValueError(
                f"the config sets {', '.join(given)} without adversarial_method: name the method (fgm, pgd, ...) "
                "or remove them."
            )
        return None
    options = dict(_read(config, "adversarial_options") or {})
    epsilon = _read(config, "adversarial_epsilon")
    if epsilon is not None:
        if "epsilon" in options:
            raise ValueError("the config sets adversarial_epsilon and adversarial_options.epsilon: keep one.")
        options["epsilon"] = epsilon
    start = _read(config, "adversarial_start_step") or 0
    name = type(trainer).__name__
    adversary = build_adversary(trainer.model, method, **options)
    make_adversarial(trainer, adversary, adversary_start_step=start)
    logger.info(
        "%s made adversarial as %s with %r, from optimizer step %d", name, type(trainer).__name__, adversary, start
    )
    return trainer

"""Adversarial methods: each says what perturbation to apply; fastadv.target says where."""

from .fgm import FGM
from .gradient_penalty import GradientPenalty

__all__ = ["FGM", "GradientPenalty"]

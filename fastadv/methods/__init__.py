"""Adversarial methods: each says what perturbation to apply; fastadv.target says where."""

from .fgm import FGM

__all__ = ["FGM"]

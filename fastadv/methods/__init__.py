"""Adversarial methods: each says what perturbation to apply; fastadv.targets says where."""

from ._common import Adversary
from .by_name import build_adversary, method_names, method_options
from .consistency import R3F, SMART, VAT
from .fgm import FGM
from .freelb import FreeLB
from .gradient_penalty import GradientPenalty
from .pgd import PGD

__all__ = [
    "FGM",
    "PGD",
    "R3F",
    "SMART",
    "VAT",
    "Adversary",
    "FreeLB",
    "GradientPenalty",
    "build_adversary",
    "method_names",
    "method_options",
]

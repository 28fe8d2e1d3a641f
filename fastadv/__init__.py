"""fastadv: adversarial training on the embedding layer, on the rows the batch touches.

``from fastadv import FGM`` replaces the copied FGM snippet with the same calls and numbers.
"""

from .errors import (
    AttackStateError,
    BackendError,
    EmbeddingNotFoundError,
    FastAdvError,
    FastAdvWarning,
    FrozenEmbeddingError,
    MissingGradientError,
    ReentrantCheckpointError,
    WeightRowsUnavailableError,
)
from .methods import FGM, PGD, R3F, SMART, VAT, FreeLB, GradientPenalty, build_adversary

__version__ = "0.1.0"

__all__ = [
    "FGM",
    "PGD",
    "R3F",
    "SMART",
    "VAT",
    "AttackStateError",
    "BackendError",
    "EmbeddingNotFoundError",
    "FastAdvError",
    "FastAdvWarning",
    "FreeLB",
    "FrozenEmbeddingError",
    "GradientPenalty",
    "MissingGradientError",
    "ReentrantCheckpointError",
    "WeightRowsUnavailableError",
    "__version__",
    "build_adversary",
]

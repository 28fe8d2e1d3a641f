"""Exceptions and warnings raised by fastadv. Every message says what was found and what to do."""


class FastAdvError(RuntimeError):
    """Base class of fastadv's errors."""


class EmbeddingNotFoundError(FastAdvError, ValueError):
    """No parameter or embedding module matches what was asked for, or several do."""


class FrozenEmbeddingError(FastAdvError):
    """The embedding to perturb does not require gradients."""


class WeightRowsUnavailableError(FastAdvError, ValueError):
    """target='weight' where the training engine keeps the table's gradient to itself (DeepSpeed ZeRO)."""


class MissingGradientError(FastAdvError):
    """attack() ran before a backward pass filled the embedding's gradient."""


class AttackStateError(FastAdvError):
    """attack() twice without restore(), or restore() without attack()."""


class ReentrantCheckpointError(FastAdvError):
    """A pass that needs dL/de through torch.autograd.grad met reentrant activation checkpointing."""


class BackendError(FastAdvError):
    """The backend asked for through FASTADV_BACKEND cannot run on these tensors."""


class FastAdvWarning(UserWarning):
    """fastadv does something that differs from the snippet it replaces, on purpose."""

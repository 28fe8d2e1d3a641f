"""What every method shares: argument checks, the closure's loss, the default backward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Closure = Callable[[], torch.Tensor]
BackwardFn = Callable[[torch.Tensor], object]


def check_epsilon(value: float, name: str = "epsilon") -> float:
    """A finite, non-negative Python number (a size such as epsilon or a step size), as a float."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, found {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, found {value}.")
    return float(value)


def check_loss(loss: object, where: str) -> torch.Tensor:
    """The closure's loss, or a clear error when it is not a scalar tensor that needs a gradient."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        found = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"{where} must return the loss as a scalar tensor, found {found}.")
    if not loss.requires_grad:
        raise RuntimeError(f"{where} returned a loss that does not require grad: run it with gradients enabled.")
    return loss


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


class SkipCounter:
    """Steps skipped on the device (NaN/Inf gradients), counted without a host sync until read."""

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None

    def add(self, skipped: torch.Tensor) -> None:
        """Count ``skipped`` (a 0-dim bool tensor, on any device) without reading it."""
        self._count = skipped.long() if self._count is None else self._count + skipped.long()

    def __int__(self) -> int:
        return 0 if self._count is None else int(self._count)

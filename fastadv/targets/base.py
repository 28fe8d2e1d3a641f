"""What every target gives a method: its gradient as a value, and a perturbation as a handle.

An attack goes down only: the method asks a target for its :class:`Gradient` (the rows it lives on
and their values), computes the scale with ``fastadv.ops``, asks the target to apply it, and keeps
the handle the target returns until it hands it back to ``restore``. No target keeps anything of
an attack between two of these calls, except what its forward hooks must add while armed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..ops import RowSet
from ..ops.backend import Backend
from .gradients import LookupGradients


@dataclass(frozen=True)
class Gradient:
    """A target's gradient on the rows it has one.

    Attributes:
        values: [N, d], read at ``rows.grad_rows`` (a dense gradient: the whole table's rows).
        rows: where the values live and where the perturbation goes (see fastadv.ops.RowSet).
        norm_group: the process group whose ranks hold the rest of the norm's terms (an FSDP2 shard,
            output mode's per-position deltas under DDP), else None.
        positions: output mode with one delta per position: the batch's ids shape, else None.
    """

    values: torch.Tensor
    rows: RowSet
    norm_group: object | None = None
    positions: torch.Size | None = None


@dataclass(frozen=True)
class Step:
    """One target's step as its method computed it: ``size * g / norm`` (FGM: epsilon, PGD: alpha;
    ``size * sign(g)`` under FGSM), taken only where ``ok``.

    Attributes:
        size: the step's length.
        norm: fp32 0-dim on the device, the gradient's norm.
        ok: bool 0-dim on the device; False leaves the target as it is (a skipped step).
    """

    size: float
    norm: torch.Tensor
    ok: torch.Tensor


class Target(Protocol):
    """A place to perturb (:class:`fastadv.targets.WeightTarget`, :class:`fastadv.targets.OutputTarget`).

    Each call raises before it modifies anything; ``within`` is the perturbation of the PGD round in
    progress, on whose rows the gradient is then read, and ``previous`` the one an ascent moves on from.
    """

    name: str
    param: nn.Parameter  # identity and device (output mode never writes it)
    group: object | None  # the data-parallel ranks whose gradients are averaged

    def gradient(
        self, backend: Backend, lookups: LookupGradients | None, average_over_ranks: bool, within: object | None
    ) -> Gradient: ...

    def add(self, gradient: Gradient, step: Step, sign: bool, backend: Backend) -> object: ...

    def ascend(
        self, gradient: Gradient, step: Step, radius: float, backend: Backend, previous: object | None
    ) -> object: ...

    def clean_value(self, perturbation: object) -> torch.Tensor | None:
        """The parameter as it was before ``perturbation`` (a new tensor), or None where it was not written."""
        ...

    def check_restorable(self, perturbation: object) -> None: ...

    def restore(self, perturbation: object) -> None: ...

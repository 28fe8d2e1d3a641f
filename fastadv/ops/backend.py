"""Which implementation runs an op: the Triton kernels or their torch reference.

The choice is made here only. ``FASTADV_BACKEND`` (``auto`` | ``torch`` | ``triton``) forces it;
``auto`` takes Triton for CUDA tensors, and for CPU tensors when the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``), else the torch reference. A forced ``triton`` that cannot
run raises: fastadv never falls back silently.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace
from typing import Literal

import torch

from ..errors import BackendError

Backend = Literal["torch", "triton"]
_CHOICES = ("auto", "torch", "triton")
# The modules of kernels/ (installed as fastadv_kernels), one per op, each named as its launcher in fastadv/ops/.
KERNEL_MODULES = ("rows_backup_add", "rows_l2_norm", "rows_pgd_step", "rows_restore", "segment_sum_by_id")
_kernels: SimpleNamespace | None = None


def kernels() -> SimpleNamespace:
    """The Triton kernels (every ``*_kernel`` of each module of ``fastadv_kernels``), imported on first use
    (Triton reads TRITON_INTERPRET at that moment)."""
    global _kernels
    if _kernels is None:
        # By name through importlib, at first use: the kernels live in the repository's top-level
        # kernels/, which setup.py installs as the namespace package fastadv_kernels (see setup.py for why it
        # has no __init__.py), so no relative import names them; and importing them imports Triton (which
        # `import fastadv` must not) and fixes, at that moment, whether they run interpreted.
        # The name follows the install: a checkout put first on PYTHONPATH still gets the installed kernels.
        found = {}
        for name in KERNEL_MODULES:
            module = importlib.import_module(f"fastadv_kernels.{name}")
            found.update({key: value for key, value in vars(module).items() if key.endswith("_kernel")})
        _kernels = SimpleNamespace(**found)
    return _kernels


def _kernels_interpreted() -> bool:
    if _kernels is not None:
        return type(_kernels.rows_restore_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton, Linux x86_64 only)"
    interpreted = _kernels_interpreted()
    if device.type == "cpu":
        if not interpreted:
            return "tensors are on the CPU and Triton's interpreter is off (set TRITON_INTERPRET=1 before import)"
        return None
    if device.type != "cuda":
        return f"Triton kernels run on CUDA tensors, found tensors on {device.type}"
    if interpreted:
        return "TRITON_INTERPRET=1 is set, so the kernels were built for CPU tensors, not CUDA"
    return None


def resolve_backend(device: torch.device) -> Backend:
    """The backend for tensors on ``device``, honouring ``FASTADV_BACKEND``."""
    choice = os.environ.get("FASTADV_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise BackendError(f"FASTADV_BACKEND={choice!r} is not one of {', '.join(_CHOICES)}.")
    if choice == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if choice == "triton" and reason is not None:
        raise BackendError(f"FASTADV_BACKEND=triton, but the Triton kernels cannot run here: {reason}.")
    return "triton" if reason is None else "torch"

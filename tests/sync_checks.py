"""Host-sync checks shared by the tests (tests/test_sync_free.py, the ``static_rows`` fixture) and bench/gpu.py.

This module imports neither conftest nor pytest: bench/gpu.py imports it without switching Triton's
interpreter on (conftest does, on CPU) and without pytest's fixtures.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from unittest import mock

import torch

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu")
SYNCING_FUNCTIONS = ("nonzero", "unique", "masked_select", "argwhere")


@contextlib.contextmanager
def host_syncs_forbidden(device: torch.device | str) -> Iterator[None]:
    """Inside the block, any tensor operation that would make the host wait for a CUDA device raises.

    On every device the ops whose result the host must read (``.item()``, ``.tolist()``, ``bool``/``int``/
    ``float`` of a tensor, ``.nonzero()``, ``.cpu()``, ``torch.nonzero/unique/masked_select/argwhere`` and
    boolean-mask indexing) raise AssertionError, so a CPU run proves what a CUDA run would. On CUDA,
    ``torch.cuda.set_sync_debug_mode("error")`` also makes every synchronizing call torch makes (a copy to
    or from pageable host memory, a stream synchronize) raise RuntimeError.
    """

    def refuse(name: str):
        def raiser(*args: object, **kwargs: object):
            raise AssertionError(f"{name} syncs the host with the device, and ran where fastadv must not sync")

        return raiser

    getitem = torch.Tensor.__getitem__

    def checked_getitem(self: torch.Tensor, index: object) -> torch.Tensor:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("boolean-mask indexing syncs the host, and ran where fastadv must not sync")
        return getitem(self, index)

    with contextlib.ExitStack() as stack:
        for name in SYNCING_METHODS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse(f"Tensor.{name}")))
        for name in SYNCING_FUNCTIONS:
            stack.enter_context(mock.patch.object(torch, name, refuse(f"torch.{name}")))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", checked_getitem))
        if torch.device(device).type == "cuda":
            stack.callback(torch.cuda.set_sync_debug_mode, torch.cuda.get_sync_debug_mode())
            torch.cuda.set_sync_debug_mode("error")
        yield


@contextlib.contextmanager
def static_row_sets() -> Iterator[None]:
    """Inside the block, row sets and segment sums take their CUDA form on any device: static shapes
    (sorted ids, first-occurrence flags, min(N, V) slots), no torch.unique; and the NaN guard decides on the
    device, reading nothing on the host. Patches the names that fastadv.targets (the recorder, the weight
    target, the lookups' gradient), the row-gradient lookup's backward and the guard call."""
    import fastadv.methods._finite
    import fastadv.ops.lookup
    import fastadv.targets.gradients
    import fastadv.targets.recorder
    import fastadv.targets.weight
    from fastadv.ops import compact_ids, row_set_from_ids, segment_sum_by_id

    static_rows = functools.partial(row_set_from_ids, static_shape=True)
    static_segments = functools.partial(segment_sum_by_id, static_shape=True)
    static_compact = functools.partial(compact_ids, static_shape=True)
    with (
        mock.patch.object(fastadv.targets.recorder, "row_set_from_ids", static_rows),
        mock.patch.object(fastadv.targets.weight, "row_set_from_ids", static_rows),
        mock.patch.object(fastadv.targets.gradients, "segment_sum_by_id", static_segments),
        mock.patch.object(fastadv.ops.lookup, "compact_ids", static_compact),
        mock.patch.object(fastadv.methods._finite, "reads_on_host", lambda device: False),
    ):
        yield

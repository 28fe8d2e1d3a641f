"""Measuring what adversarial training costs: time and extra memory of a callable, CPU or CUDA.

Shared by ``bench/``, ``examples/demo.py`` and the tests (pyproject's pytest ``pythonpath``), so all report
the same quantities; not part of the installed package:

- time: median wall-clock seconds over repeats, with the device synchronized around each call;
- extra memory: on CUDA, the peak allocated above what was allocated before the call; on CPU
  (no peak counter there), the bytes the call allocated, summed over torch's allocations, as
  torch.profiler's memory profile reports them;
- peak memory: the peak above the start on both (CPU: replayed from the profiler's allocation
  and free events, in order);
- gradient copies: bytes copied out of parameters' ``.grad`` (what PGD's snippet backs up).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls; ``setup()`` runs untimed before each."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def extra_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Memory ``fn()`` costs: CUDA peak above the starting allocation, or CPU bytes allocated."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's own allocations; "[memory]" rows are frees of tensors allocated elsewhere.
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages() if e.key != "[memory]")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The peak of memory allocated during ``fn()`` above what was allocated before it (CUDA or CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return extra_memory_bytes(fn, device)
    return peak_of(cpu_memory_events(fn))


def cpu_memory_events(fn: Callable[[], object]) -> list[int]:
    """The bytes of every CPU allocation (+) and free (-) during ``fn()``, in the order they happened,
    as torch.profiler's memory profile records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return [nbytes for _, nbytes in events]


def peak_of(events: list[int]) -> int:
    """The peak of the bytes live, replaying allocations and frees (see :func:`cpu_memory_events`) from 0."""
    live = peak = 0
    for nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class GradientCopies(TorchDispatchMode):
    """Counts the bytes of every copy made of a tensor that shares storage with a parameter's ``.grad``.

    ``with GradientCopies(model) as copies: ...`` then ``copies.bytes`` / ``copies.count``. It sees
    torch ops only: a kernel reading the gradient in place copies nothing (Triton's CPU interpreter
    does copy every argument to host memory, so check the torch path on CPU).
    """

    COPYING = frozenset({torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default})

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.count = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPYING:
            grads = {p.grad.untyped_storage().data_ptr() for p in self.model.parameters() if p.grad is not None}
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if isinstance(source, torch.Tensor) and source.untyped_storage().data_ptr() in grads:
                self.count += 1
                self.bytes += source.numel() * source.element_size()
        return func(*args, **(kwargs or {}))


def device_description(device: torch.device | str) -> str:
    """The hardware a number came from, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU x86_64, 2 threads'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads"


def environment() -> dict[str, str]:
    """Versions and date to store beside every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",  # the CUDA torch was built with ("none" for a CPU build)
    }

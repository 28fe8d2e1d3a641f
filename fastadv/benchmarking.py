"""Measuring what adversarial training costs: time and extra memory of a callable, CPU or CUDA.

Shared by ``bench/`` and ``examples/demo.py`` so both report the same quantities:

- time: median wall-clock seconds over repeats, with the device synchronized around each call;
- extra memory: on CUDA, the peak allocated above what was allocated before the call; on CPU
  (no peak counter there), the bytes the call allocated, summed over torch's allocations, as
  torch.profiler's memory profile reports them.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch


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
    }

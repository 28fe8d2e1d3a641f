"""What the bench scripts share: logging, provenance, timing in turns, and appending CSV rows."""

from __future__ import annotations

import csv
import gc
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastadv.benchmarking import device_description, environment, median_seconds

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "date",
    "device",
    "device_type",
    "torch",
    "triton",
    "python",
    "benchmark",
    "vocab",
    "dim",
    "batch",
    "impl",
    "median_s",
    "repeats",
    "extra_memory_bytes",
    "notes",
]


def provenance(device: torch.device) -> dict[str, str]:
    """The columns every result row starts with: date, device (in words and its type) and versions."""
    env = environment()
    base = {"date": env["date"], "device": device_description(device), "device_type": device.type}
    return base | {k: env[k] for k in ("torch", "triton", "python")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fastadv_revision() -> str:
    """fastadv's version and the commit of its checkout (+dirty when fastadv/ or kernels/ differ from it)."""
    import fastadv

    root = Path(fastadv.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "?"
        dirty = "+dirty" if git("status", "--porcelain", "--", "fastadv", "kernels") else ""
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    return f"fastadv {fastadv.__version__} @ {commit}{dirty}"


def load_average() -> float:
    """The 1-minute load average (2 cores busy = 2.0): how shared the machine was while timing."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def load_note(before: float) -> str:
    return f"loadavg(1min) before/after timing={before:.2f}/{load_average():.2f}; timed in turns"


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turns (a b c, c b a, a b c, ...), each by median_seconds.

    Taking turns, rather than all repeats of one and then of the next, makes a change of load on a
    shared machine fall on every implementation alike instead of on whichever ran at that moment.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(repeats):
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(median_seconds(fns[name], device, repeats=1, warmup=1 if i == 0 else 0))
    return {name: statistics.median(t) for name, t in times.items()}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def append_rows(rows: list[dict], csv_path: Path) -> None:
    """Append rows to a results CSV (never overwriting), refusing a file with other columns."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    if not new:
        with csv_path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != COLUMNS:
            raise SystemExit(f"{csv_path} has columns {header}, expected {COLUMNS}: not appending to it.")
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)

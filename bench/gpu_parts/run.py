"""What the parts of bench/gpu.py share: the sizes (FULL on a GPU, QUICK in CI), the run, how a part ends."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import Layout, append_rows, log
from measure import median_seconds
from step_cost import QUICK_SHAPES, Shape

EPSILON = 1.0


@dataclass(frozen=True)
class Sizes:
    """Every size the parts use: FULL on a GPU, QUICK on a CPU in CI (tiny, about a minute in all)."""

    repeats: int  # timed calls per median, whole steps
    attack_repeats: int  # timed attack+restore pairs per median
    tests: tuple[str, ...]  # pytest's arguments
    tests_timeout_s: int
    attack_vocabs: tuple[int, ...]
    attack_dim: int
    attack_batch: tuple[int, int]  # batch, seq: B*T random ids
    dtype: torch.dtype  # of the tables, models and optimizer states in the attack, step, pgd and gp parts
    llama: tuple[int, int, int, int]  # the step part's Llama: hidden, layers, intermediate, seq
    step_configs: tuple[tuple[int, int], ...]  # (vocab, tokens = B*T)
    compare: tuple[int, int, int, int, int, int]  # the pgd and gp parts' Llama: vocab, hidden, layers, inter, B, T
    kernels: tuple[int, int, int]  # vocab, dim, ids (positions) for the kernel bandwidths
    segment: tuple[int, int, int]  # vocab, dim, positions for the skewed segment sum
    cost: Shape  # the cost part's model (bench/step_cost.py): every method's step, rows vs dense
    budgets_s: dict[str, float] = field(default_factory=dict)  # per part: no new configuration after this


FULL = Sizes(
    repeats=5,
    attack_repeats=20,
    tests=(),
    tests_timeout_s=540,
    attack_vocabs=(32000, 128000, 256000),
    attack_dim=4096,
    attack_batch=(8, 1024),
    dtype=torch.bfloat16,
    llama=(4096, 2, 14336, 2048),
    step_configs=((128000, 8192), (256000, 8192), (128000, 32768), (256000, 32768)),
    compare=(128000, 1024, 2, 3584, 4, 1024),
    kernels=(256000, 4096, 131072),
    segment=(128000, 4096, 32768),
    cost=Shape("qwen2-4096", "qwen2", 151_936, 4096, 2, (4, 1024), "embed_tokens"),
    budgets_s={"sync": 90, "graph": 90, "attack": 150, "step": 300, "cost": 120, "pgd": 90, "gp": 90, "kernels": 90}
    | {"segment": 60, "host": 90},
)
QUICK = Sizes(
    repeats=1,
    attack_repeats=2,
    tests=("tests/ops/test_launch.py",),
    tests_timeout_s=300,
    attack_vocabs=(1000, 4000),
    attack_dim=60,
    attack_batch=(4, 64),
    dtype=torch.bfloat16,
    llama=(64, 1, 224, 32),
    step_configs=((1000, 64), (2000, 128)),
    compare=(1000, 64, 1, 224, 2, 32),
    kernels=(1000, 60, 128),
    segment=(1000, 60, 128),
    cost=QUICK_SHAPES["qwen2"],
    budgets_s={},
)


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def gib(nbytes: float) -> float:
    """Bytes in GiB."""
    return nbytes / 2**30


class PartFailed(Exception):
    """A part ran and found something wrong; the message is its summary."""


class NeedsCuda(Exception):
    """A part that only means something on a CUDA device (reported, not a failure)."""


@dataclass
class PartResult:
    """How one part ended, for the summary table."""

    name: str
    status: str  # "ok", "FAILED", "needs CUDA", "skipped"
    seconds: float
    summary: str


class Run:
    """What the parts share: the device, the sizes, where results go, and what the plot draws."""

    def __init__(self, device: torch.device, sizes: Sizes, out: Path, quick: bool, tests_workers: int = 0) -> None:
        self.device, self.sizes, self.out, self.quick = device, sizes, out, quick
        self.tests_workers = tests_workers
        self.deadline = math.inf
        self.plot_data: dict[str, list[dict]] = {}
        self._copy_bps: float | None = None

    def copy_bandwidth(self) -> float:
        """Bytes per second of a large device-to-device copy of random bf16 data, counting bytes read and
        written: the ceiling the kernels are measured against, measured once per run."""
        if self._copy_bps is None:
            src = torch.randn(2**30 if self.device.type == "cuda" else 2**22, device=self.device, dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            seconds = median_call_seconds(lambda: dst.copy_(src), self.device)
            self._copy_bps = 2 * src.numel() * src.element_size() / seconds
            log(f"copy bandwidth {self._copy_bps / 1e9:.0f} GB/s ({src.numel() * 2 / 2**30:.3g} GiB read + written)")
        return self._copy_bps

    def over_budget(self, what: str) -> bool:
        """True (and says so) when the running part has spent its budget: ``what`` is then skipped."""
        if time.monotonic() < self.deadline:
            return False
        log(f"  part over its time budget: skipping {what}")
        return True

    def save(self, name: str, rows: list[dict], layout: Layout) -> None:
        """Append the part's rows to ``name`` under --out at once, so a run cut short keeps them."""
        if rows:
            append_rows(rows, self.out / name, layout)
            log(f"  {len(rows)} rows appended to {self.out / name}")


def median_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """CUDA: triton.testing.do_bench's median (CUDA events, warm-up, L2 flushed before each call). CPU:
    median wall clock of a few calls (the interpreter's or torch's: no bandwidth meaning)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    return median_seconds(fn, device, repeats=2, warmup=1)

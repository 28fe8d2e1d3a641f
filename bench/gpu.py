"""One command that proves and measures fastadv on a GPU: the tests, no host sync, CUDA graphs, speed and memory.

    python bench/gpu.py                              # CUDA: every part; CSVs appended under bench/results
    python bench/gpu.py --out "$OUT"                 # the same, results under $OUT (the device tool's folder)
    python bench/gpu.py --parts sync,graph,attack    # a subset, e.g. to rerun one part on a short lease
    python bench/gpu.py --skip-tests                 # every part but the test suite
    python bench/gpu.py --quick                      # CPU (CI): tiny sizes, about a minute, nothing saved
    TRITON_INTERPRET=1 python bench/gpu.py --quick   # the same, the Triton kernels interpreted on CPU

Parts, in order (each timed and budgeted; a part that fails is recorded and the others still run; the
exit code is 1 when any part failed; "needs CUDA" and "skipped" are not failures):

    sync     attack and restore under a guard that makes any host sync raise (on CUDA also
             torch.cuda.set_sync_debug_mode("error")): FGM weight mode, output mode with shared rows and
             per position; PGD first and later attack; the gradient penalty's own part. Each case also
             checks that the attack changed something and that restore put the weights back bit for bit.
    graph    FGM's clean pass, attack, adversarial pass and restore captured in a torch.cuda.CUDAGraph,
             replayed on a new batch, compared with the same step run eagerly. Needs CUDA; on a CPU the
             same comparison runs eagerly, so that it cannot rot.
    attack   attack+restore time and extra memory, the copied snippet vs fastadv.FGM, bf16 tables.
    step     a whole training step of a Llama-shaped model (plain, snippet FGM, fastadv FGM, AdamW, bf16):
             time relative to the plain step and peak memory; configurations that cannot fit are skipped.
    cost     bench/step_cost.py on a Qwen2-like model (V = 151,936, d = 4096, 2 layers, bf16, 4 x 1024
             tokens, fused AdamW): plain, snippet FGM, FGM.step, pgd.step, FreeLB, the gradient penalty,
             each fastadv step with the table's gradient added as rows and with torch's dense backward.
    pgd      PGD K=3: the snippet's loop, fastadv's drop-in calls and pgd.step, on a smaller Llama.
    gp       the gradient penalty, finite difference vs exact (eager attention), on the same smaller Llama.
    kernels  each Triton kernel's achieved bandwidth as a fraction of the measured copy bandwidth.
    segment  the segment sum with skewed ids (one id at half of the positions, as padding is) vs uniform.
    tests    the test suite (python -m pytest -q) in a subprocess with a timeout, its output in
             gpu_tests.log; conftest picks CUDA and adds the bf16/fp16 kernel cases. Last, so that a run
             cut short has saved every measurement. --quick runs tests/test_sync_free.py only (CI runs
             the suite), so that this runner cannot rot.

Results: gpu_attack.csv, gpu_step.csv, gpu_step_cost.csv, gpu_kernels.csv (appended, with device, versions, commit and
date), gpu_<device type>.png, gpu_tests.log and gpu_run.log (this output) under --out. A compact
summary table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    SHAPE_LAYOUT,
    Layout,
    append_rows,
    fastadv_revision,
    interleaved_medians,
    llama_lm,
    log,
    provenance,
    relative_grad_difference,
    release,
    result_rows,
)
from gradient_penalty import EPSILON as GP_EPSILON
from gradient_penalty import compare_gradient_penalty
from measure import device_description, environment, median_seconds, peak_memory_bytes, synchronize
from pgd import ALPHA, K, compare_pgd
from snippet_vs_fastadv import bench_attack
from step_cost import LAYOUT as COST_LAYOUT
from step_cost import QUICK_SHAPES, Shape, bench_shape
from torch import nn

from fastadv import FGM, PGD, GradientPenalty
from fastadv.ops import (
    resolve_backend,
    row_set_from_ids,
    rows_backup_add,
    rows_l2_norm,
    rows_pgd_step,
    rows_restore,
    segment_sum_by_id,
)
from fastadv.snippets import SnippetFGM

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # appended: bench's own modules come first
from sync_checks import host_syncs_forbidden, static_row_sets  # noqa: E402

# The suite runs last: a run cut short (a lease's time limit) has then saved every measurement, and
# pytest's log so far.
PARTS = ("sync", "graph", "attack", "step", "cost", "pgd", "gp", "kernels", "segment", "tests")
EPSILON = 1.0
LLAMA_EMB_NAME = "embed_tokens"  # as the snippet is called on a Llama: model.embed_tokens.weight
FIT_FRACTION = 0.85  # a configuration runs when its estimated peak is under this fraction of the device
STEP_LAYOUT = Layout(
    config=("model", "vocab", "hidden", "layers", "tokens", "dtype"),
    metrics=(
        "status",
        "median_s",
        "repeats",
        "vs_plain",
        "peak_bytes",
        "peak_above_start_bytes",
        "estimated_peak_bytes",
    ),
)
KERNEL_LAYOUT = Layout(
    config=("backend", "ids", "vocab", "dim", "dtype", "positions", "distinct_rows"),
    metrics=("median_s", "min_bytes", "gb_per_s", "copy_gb_per_s", "fraction_of_copy"),
    impl="kernel",
)


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Every size the parts use: FULL on a GPU, QUICK on a CPU in CI (tiny, about a minute in all)."""

    repeats: int  # timed calls per median, whole steps
    attack_repeats: int  # timed attack+restore pairs per median
    tests: tuple[str, ...]  # pytest's arguments
    tests_timeout_s: int
    small: tuple[int, int, int, int]  # SmallLM for the sync and graph parts: vocab, dim, batch, seq
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
    small=(32000, 1024, 8, 256),
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
    | {"segment": 60},
)
QUICK = Sizes(
    repeats=1,
    attack_repeats=2,
    tests=("tests/test_sync_free.py",),
    tests_timeout_s=300,
    small=(211, 60, 4, 13),
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


# ---------------------------------------------------------------- the run: parts, results, summary


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


def run_parts(run: Run, parts: list[str], skip_tests: bool) -> list[PartResult]:
    """Run ``parts`` in order, each caught, timed and budgeted; the others are listed as skipped."""
    functions: dict[str, Callable[[Run], str]] = {
        "tests": part_tests, "sync": part_sync, "graph": part_graph, "attack": part_attack, "step": part_step,
        "cost": part_cost, "pgd": part_pgd, "gp": part_gp, "kernels": part_kernels, "segment": part_segment,
    }  # fmt: skip
    results = []
    for name in PARTS:
        if name not in parts:
            reason = "--skip-tests" if name == "tests" and skip_tests else "not in --parts"
            results.append(PartResult(name, "skipped", 0.0, reason))
            continue
        print(f"\n======== {name} ========", flush=True)
        start = time.monotonic()
        run.deadline = start + run.sizes.budgets_s.get(name, math.inf)
        try:
            status, summary = "ok", functions[name](run)
        except NeedsCuda as err:
            status, summary = "needs CUDA", str(err)
        except PartFailed as err:  # the part said what went wrong
            status, summary = "FAILED", str(err)
        except Exception as err:  # one part's failure must not stop the others
            traceback.print_exc(file=sys.stdout)
            status, summary = "FAILED", f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if run.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")  # whatever a failed check left behind
        release(run.device)
        seconds = time.monotonic() - start
        log(f"{name}: {status} in {seconds:.1f} s: {summary}")
        results.append(PartResult(name, status, seconds, summary))
    return results


def print_summary(results: list[PartResult], run: Run) -> None:
    """The compact table printed last (the device tool shows only the tail of the output)."""
    env = environment()
    print(
        f"\n======== summary: {device_description(run.device)}; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, python {env['python']}; {fastadv_revision()}; "
        f"FASTADV_BACKEND={os.environ.get('FASTADV_BACKEND', 'auto')}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}{', quick' if run.quick else ''}"
    )
    print(f"{'part':<8} {'status':<10} {'seconds':>8}  result")
    for r in results:
        print(f"{r.name:<8} {r.status:<10} {r.seconds:>8.1f}  {r.summary}")
    total = sum(r.seconds for r in results)
    failed = [r.name for r in results if r.status == "FAILED"]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every part that ran passed"
    print(f"total {total:.0f} s; {verdict}", flush=True)


# ---------------------------------------------------------------- tests


def pytest_counts(output: str) -> str:
    """'412 passed, 3 skipped' from pytest's summary line; without one (a run cut short), what its -q
    progress lines ('..F.s  [ 42%]') show so far."""
    for line in reversed(output.splitlines()):
        counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line)
        if counts and (" in " in line or "no tests ran" in line):
            return ", ".join(f"{n} {what}" for n, what in counts)
    progress = re.findall(r"^([.FEsxX]+)\s+\[\s*(\d+)%\]$", output, flags=re.MULTILINE)
    marks = "".join(m for m, _ in progress)
    done = progress[-1][1] if progress else "0"
    passed, failed, errors = (marks.count(c) for c in ".FE")
    return f"no summary line; at {done}%: {passed} passed, {failed} failed, {errors} errors"


def part_tests(run: Run) -> str:
    """The test suite in a subprocess with a timeout; full output in gpu_tests.log, counts in the summary."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *run.sizes.tests]
    if run.tests_workers:  # pytest-xdist; one file per worker, so a file's distributed tests never overlap
        command += ["-n", str(run.tests_workers), "--dist", "loadfile"]
    log_path = run.out / "gpu_tests.log"
    log(f"{' '.join(command[1:])} (timeout {run.sizes.tests_timeout_s} s), output in {log_path}")
    with log_path.open("w") as output:
        # A session of its own: on a timeout, its whole process group (distributed workers too) is killed.
        proc = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: int | None = proc.wait(timeout=run.sizes.tests_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    text = log_path.read_text(errors="replace")
    counts = pytest_counts(text)
    problems = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    for line in problems[:40]:
        print(f"  {line[:200]}")
    if len(problems) > 40:
        print(f"  ... {len(problems) - 40} more in {log_path}")
    if returncode is None:
        raise PartFailed(f"timed out after {run.sizes.tests_timeout_s} s ({counts} so far; see {log_path.name})")
    if returncode != 0:
        raise PartFailed(f"pytest exit code {returncode}: {counts}")
    return counts + (" (quick: " + " ".join(run.sizes.tests) + " only; CI runs the suite)" if run.quick else "")


# ---------------------------------------------------------------- a small model for the sync and graph parts


class SmallLM(nn.Module):
    """An embedding (row 0 the padding row), two GELU layers and a per-token classifier: every op of its
    forward and backward can be captured in a CUDA graph.

    forward(ids [B, T] int64, labels [B, T] int64) returns the mean cross-entropy loss (a scalar).
    """

    CLASSES = 8

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, self.CLASSES)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.body(self.emb(ids))).flatten(0, 1), labels.flatten())


def small_model(run: Run) -> SmallLM:
    """SmallLM of the run's sizes, seed 0, on the run's device (fp32)."""
    vocab, dim, _, _ = run.sizes.small
    torch.manual_seed(0)
    return SmallLM(vocab, dim).to(run.device)


def small_batch(run: Run, seed: int, low: int = 1, high: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], labels [B, T]): ids in [low, high), the last two positions of each row padding (0)."""
    vocab, _, batch, seq = run.sizes.small
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high or vocab, (batch, seq), generator=gen)
    ids[:, -2:] = 0
    labels = torch.randint(0, SmallLM.CLASSES, (batch, seq), generator=gen)
    return ids.to(run.device), labels.to(run.device)


# ---------------------------------------------------------------- sync


def assert_attack_changed(perturbed: torch.Tensor, clean: torch.Tensor, what: str) -> None:
    """A check that proves something: the attack moved the embedding (any shape, compared bitwise)."""
    assert not torch.equal(perturbed, clean), f"{what}: the attack changed nothing, so the check would prove nothing"


def assert_restored(weight: torch.Tensor, before: torch.Tensor, what: str) -> None:
    """restore() put the [V, d] table back bit for bit."""
    assert torch.equal(weight, before), f"{what}: restore() did not put the weights back bit for bit"


def sync_fgm(run: Run, target: str, share_rows: bool) -> None:
    """FGM attack, a forward through the embedding (output mode: its hook adds delta), restore: all guarded."""
    model, (ids, labels) = small_model(run), small_batch(run, seed=1)
    fgm = FGM(model, EPSILON, target=target, share_rows=share_rows)
    model(ids, labels).backward()
    emb = model.emb
    before = emb.weight.detach().clone()
    with torch.no_grad():  # without gradients: the captured micro-batch stays
        clean = emb(ids)
    fgm.attack()  # once unguarded: the kernels compile outside the check, which is about every step
    fgm.restore()
    with host_syncs_forbidden(run.device):
        fgm.attack()
        with torch.no_grad():
            perturbed = emb(ids)
        fgm.restore()
    assert_attack_changed(perturbed, clean, f"FGM target={target}")
    assert_restored(emb.weight, before, f"FGM target={target}")


def sync_pgd(run: Run, target: str) -> None:
    """PGD's first attack, the model's own pass at the perturbed point (unguarded), a later attack, restore."""
    model, (ids, labels) = small_model(run), small_batch(run, seed=1)
    pgd = PGD(model, EPSILON, ALPHA, K, target=target)

    def backward() -> None:
        model.zero_grad()
        model(ids, labels).backward()

    backward()
    pgd.attack(is_first_attack=True)  # one unguarded round: the kernels compile outside the check
    backward()
    pgd.attack()
    pgd.restore()
    backward()
    emb = model.emb
    before = emb.weight.detach().clone()
    with torch.no_grad():
        clean = emb(ids)
    with host_syncs_forbidden(run.device):
        pgd.attack(is_first_attack=True)
    backward()  # the model's own forward and backward may sync
    with host_syncs_forbidden(run.device):
        pgd.attack()  # re-addresses the new gradient to the round's rows, ascends, projects
        with torch.no_grad():
            perturbed = emb(ids)
        pgd.restore()
    assert_attack_changed(perturbed, clean, f"PGD target={target}")
    assert_restored(emb.weight, before, f"PGD target={target}")


class GuardedRegion:
    """host_syncs_forbidden entered and left at points no ``with`` block can wrap (inside a method, in hooks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.entered = 0
        self._stack: contextlib.ExitStack | None = None

    def enter(self) -> None:
        self.exit()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(host_syncs_forbidden(self.device))
        self.entered += 1

    def exit(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def sync_gradient_penalty(run: Run) -> None:
    """The finite-difference penalty's own part, guarded: from dL/de (the clean pass's backward to the
    embedding output, the model's) to the adversarial forward (the model's), where fastadv checks dL/de
    for NaN/Inf and scales it into the delta; and the adversarial lookup, whose hook adds the delta."""
    model, (ids, labels) = small_model(run), small_batch(run, seed=1)
    gp = GradientPenalty(model, EPSILON, mode="finite_difference")
    region = GuardedRegion(run.device)
    outputs: list[torch.Tensor] = []
    passes = 0
    dl_de = gp._output_gradients  # the one seam between the model's backward and fastadv's own part

    def dl_de_then_guard(loss: torch.Tensor, create_graph: bool) -> list:
        grads = dl_de(loss, create_graph)
        region.enter()
        return grads

    def closure() -> torch.Tensor:
        nonlocal passes
        passes += 1
        region.exit()  # the model's own forward may sync
        return model(ids, labels)

    def before_lookup(module: nn.Module, args: tuple) -> None:
        if passes == 2:
            region.enter()

    def after_lookup(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # runs after fastadv's hook
        outputs.append(output.detach().clone())
        region.exit()

    gp._output_gradients = dl_de_then_guard
    handles = [model.emb.register_forward_pre_hook(before_lookup), model.emb.register_forward_hook(after_lookup)]
    try:
        gp.step(closure)
    finally:
        region.exit()
        for handle in handles:
            handle.remove()
        del gp._output_gradients
    assert region.entered == 2, f"the guarded regions ran {region.entered} times, not 2: the check proved nothing"
    assert_attack_changed(outputs[1], outputs[0], "gradient penalty")


def guard_self_check(run: Run) -> None:
    """The guard catches a sync: .item() everywhere, and on CUDA a copy to the host (the debug mode's)."""
    x = torch.ones(2, device=run.device).sum()
    with contextlib.suppress(AssertionError), host_syncs_forbidden(run.device):
        x.item()
        raise RuntimeError("the guard let .item() through")
    if run.device.type == "cuda":
        with contextlib.suppress(RuntimeError), host_syncs_forbidden(run.device):
            x.to("cpu")
            raise AssertionError("set_sync_debug_mode('error') let a device-to-host copy through")


def part_sync(run: Run) -> str:
    """Every case under the guard; on CPU with the static row form forced, as CUDA takes it."""
    cases: dict[str, Callable[[], None]] = {
        "guard catches a sync": lambda: guard_self_check(run),
        "FGM weight": lambda: sync_fgm(run, "weight", True),
        "FGM output, shared rows": lambda: sync_fgm(run, "output", True),
        "FGM output, per position": lambda: sync_fgm(run, "output", False),
        "PGD weight, first + later attack": lambda: sync_pgd(run, "weight"),
        "PGD output, first + later attack": lambda: sync_pgd(run, "output"),
        "gradient penalty (finite difference)": lambda: sync_gradient_penalty(run),
    }
    form = "CUDA's own (static shapes)" if run.device.type == "cuda" else "static, forced as on CUDA"
    log(f"backend {resolve_backend(run.device)}, row sets {form}, SmallLM {run.sizes.small}")
    failed = []
    with static_row_sets() if run.device.type == "cpu" else contextlib.nullcontext():
        for name, case in cases.items():
            try:
                case()
                log(f"  ok      {name}")
            except Exception as err:
                traceback.print_exc(file=sys.stdout)
                failed.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                log(f"  FAILED  {name}")
    if failed:
        raise PartFailed(f"{len(failed)} of {len(cases)} cases failed: {'; '.join(failed)}")
    return f"{len(cases)}/{len(cases)} cases sync-free (attack changed the embedding, restore bitwise)"


# ---------------------------------------------------------------- graph


class AdversarialOutput:
    """Copies the embedding's output during the adversarial pass into one static buffer (a forward hook
    registered after fastadv's, so it sees the perturbed output): what the adversarial pass saw."""

    def __init__(self, module: nn.Module) -> None:
        self.armed = False
        self.buffer: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.armed:
            if self.buffer is None:  # allocated by the first (eager) step, before any capture
                self.buffer = torch.empty_like(output)
            self.buffer.copy_(output)


def fgm_step(model: SmallLM, fgm: FGM, ids: torch.Tensor, labels: torch.Tensor, probe: AdversarialOutput) -> None:
    """zero_grad, clean forward/backward, attack, adversarial forward/backward, restore (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    model(ids, labels).backward()
    fgm.attack()
    probe.armed = True
    model(ids, labels).backward()
    probe.armed = False
    fgm.restore()


def graph_case(run: Run, target: str) -> str:
    """Capture fgm_step in a CUDA graph on one batch, replay it on another, compare with the eager step.

    Python runs once, at capture. fastadv's hooks record the batch's ids as ``ids.detach()``, a view of
    the static input buffer, not a copy, and every tensor made from it (sorted ids, first flags, the
    slots, dL/de summed per id in output mode, the saved rows) is made by captured kernels, into the
    graph's memory. A replay runs those kernels on whatever the static buffers hold, so a new batch
    copied into them is perturbed on its own rows. The two batches here use disjoint ids (lower and
    upper half of the vocabulary): a row set frozen at capture would leave the new batch unperturbed
    and differ from the eager step. What a graph cannot follow is what it fixes anyway: shapes, and
    the number of lookups and backward passes per step (so no gradient accumulation across replays).
    fastadv's skip counter, read on the host, reflects the last replay only.

    Without CUDA the same steps and checks run eagerly ("replay" is the step run again on the static
    buffers), so the comparison itself is exercised on a CPU.
    """
    vocab = run.sizes.small[0]
    model = small_model(run)
    twin = copy.deepcopy(model)  # before any hook: a deepcopy would copy the hooks too
    fgm, twin_fgm = FGM(model, EPSILON, target=target), FGM(twin, EPSILON, target=target)
    probe, twin_probe = AdversarialOutput(model.emb), AdversarialOutput(twin.emb)
    original = model.emb.weight.detach().clone()
    static_ids, static_labels = small_batch(run, seed=1, high=vocab // 2)
    new_ids, new_labels = small_batch(run, seed=2, low=vocab // 2)

    def step() -> None:
        fgm_step(model, fgm, static_ids, static_labels, probe)

    cuda = run.device.type == "cuda"
    side = torch.cuda.Stream() if cuda else None  # warm-up on a side stream, as torch.cuda.graphs' docs require
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(3):
            step()
    replay = step
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
        model.zero_grad(set_to_none=True)  # as the docs do: the capture allocates the gradients in its pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replay = graph.replay
    static_ids.copy_(new_ids)
    static_labels.copy_(new_labels)
    replay()
    fgm_step(twin, twin_fgm, new_ids, new_labels, twin_probe)
    synchronize(run.device)

    clean = F.embedding(new_ids, original)
    moved = (probe.buffer - clean).abs().amax(dim=-1) > 0  # [B, T]: positions the replay perturbed
    not_padding = new_ids != 0
    assert moved[not_padding].all(), "the replay left some of the new batch's tokens unperturbed"
    assert_restored(model.emb.weight, original, f"graph replay, target={target}")
    assert_restored(twin.emb.weight, original, f"eager step, target={target}")
    output_diff = (probe.buffer - twin_probe.buffer).abs().max().item()
    grad_diff = relative_grad_difference(model, twin)
    bitwise = all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    # The replay runs the eager step's kernels on the same inputs: equal up to the order of fp32 sums in
    # kernels free to change it (cuBLAS split-K, atomics), ~sqrt(B*T) * 2^-24 relative, far under 1e-5;
    # a wrong or stale row set moves the result by O(1).
    assert grad_diff <= 1e-5, f"graph replay vs eager: gradients differ by {grad_diff:.3g} (relative)"
    assert output_diff <= 1e-5 * clean.abs().max().item(), f"perturbed outputs differ by {output_diff:.3g}"
    return (
        f"{target}: replay on a new batch == eager (grads {'bitwise' if bitwise else f'rel diff {grad_diff:.1e}'}, "
        f"perturbed lookups max diff {output_diff:.1e}), weights restored bitwise"
    )


def part_graph(run: Run) -> str:
    """graph_case in weight and output mode; on a CPU the eager comparison, then "needs CUDA"."""
    log(f"SmallLM {run.sizes.small} (vocab, dim, B, T), fp32, FGM epsilon {EPSILON}")
    results = []
    with static_row_sets() if run.device.type == "cpu" else contextlib.nullcontext():
        for target in ("weight", "output"):
            results.append(graph_case(run, target))
            log(f"  {results[-1]}")
    if run.device.type != "cuda":
        raise NeedsCuda("CUDA graphs need a CUDA device (the same comparison, run eagerly, passed)")
    return "; ".join(results)


# ---------------------------------------------------------------- attack


def part_attack(run: Run) -> str:
    """bench_attack (snippet_vs_fastadv.py) per vocabulary size, on the run's dtype and batch."""
    s = run.sizes
    batch, seq = s.attack_batch
    results = []
    for vocab in s.attack_vocabs:
        if run.over_budget(f"V={vocab}"):
            break
        results.append(bench_attack(vocab, s.attack_dim, run.device, s.attack_repeats, s.dtype, batch, seq))
    rows = []
    for r in results:
        times = {impl: r[f"{impl}_s"] for impl in ("snippet", "fastadv")}
        memory = {impl: r[f"{impl}_mem"] for impl in ("snippet", "fastadv")}
        shape = {"vocab": r["vocab"], "dim": r["dim"], "batch": f"{batch}x{seq}"}
        note = f"{dtype_name(s.dtype)} table; {fastadv_revision()}; {r['notes']}"
        rows += result_rows(run.device, "gpu_attack_restore", shape, times, s.attack_repeats, memory, note)
    run.save("gpu_attack.csv", rows, SHAPE_LAYOUT)
    run.plot_data["attack"] = results
    print(f"\nattack+restore, {dtype_name(s.dtype)} table V x {s.attack_dim}, {batch}x{seq} random ids (median):")
    print(f"{'V':>8} {'snippet ms':>11} {'fastadv ms':>11} {'faster':>7} {'snippet MiB':>12} {'fastadv MiB':>12}")
    for r in results:
        print(
            f"{r['vocab']:>8} {r['snippet_s'] * 1e3:>11.3f} {r['fastadv_s'] * 1e3:>11.3f} "
            f"{r['snippet_s'] / r['fastadv_s']:>6.1f}x {r['snippet_mem'] / 2**20:>12.1f} "
            f"{r['fastadv_mem'] / 2**20:>12.1f}"
        )
    if not results:
        return "no configuration ran"
    last = results[-1]
    return (
        f"V={last['vocab']}: {last['snippet_s'] * 1e3:.2f} -> {last['fastadv_s'] * 1e3:.3f} ms "
        f"({last['snippet_s'] / last['fastadv_s']:.3g}x), memory {last['snippet_mem'] / 2**20:.3g} -> "
        f"{last['fastadv_mem'] / 2**20:.1f} MiB"
    )


# ---------------------------------------------------------------- step


def llama_step_estimate(vocab: int, tokens: int, hidden: int, layers: int, intermediate: int, dtype_bytes: int) -> dict:
    """The peak bytes of one FGM training step of llama_lm (AdamW, every tensor in the parameters' dtype), by part.

    - state: weights, gradients and AdamW's two moments, 4 x params x dtype (torch keeps the moments in the
      parameter's dtype; fused AdamW makes no model-sized temporaries);
    - logits: 12 x N x V. transformers upcasts the [N, V] logits to fp32 for the loss; the backward begins
      with the fp32 log-softmax (saved), its fp32 gradient and the fp32 gradient of the upcast logits live
      at once (the forward peaks lower: the dtype logits, their fp32 copy, the log-softmax: 10 x N x V in bf16);
    - activations: per token and layer about 10 hidden-wide and 4 intermediate-wide tensors are saved
      (norm inputs and outputs, q/k/v, attention output, gate, up, SiLU, their product), plus 4 x hidden;
    - snippet_backup: the snippet's clone of the table, alive through its adversarial pass (fastadv's
      saved rows are min(N, V) x hidden at most, included in the slack);
    - slack: 1 GiB for the allocator's rounding, cuBLAS workspaces and fastadv's rows.
    """
    heads = max(1, hidden // 128)
    kv_dim = max(1, heads // 4) * (hidden // heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate + 2 * hidden
    params = layers * per_layer + 2 * vocab * hidden + hidden
    parts = {
        "params": params,
        "state": 4 * params * dtype_bytes,
        "logits": 12 * tokens * vocab,
        "activations": tokens * dtype_bytes * (layers * (10 * hidden + 4 * intermediate) + 4 * hidden),
        "snippet_backup": vocab * hidden * dtype_bytes,
        "slack": 2**30,
    }
    parts["total"] = sum(v for k, v in parts.items() if k != "params")
    return parts


def describe_estimate(e: dict) -> str:
    """One line of llama_step_estimate's parts, in GiB."""
    return (
        f"{e['params'] / 1e9:.2f} B params -> state {gib(e['state']):.1f} GiB + logits {gib(e['logits']):.1f} "
        f"+ activations {gib(e['activations']):.1f} + snippet backup {gib(e['snippet_backup']):.1f} + slack 1 "
        f"= {gib(e['total']):.1f} GiB"
    )


def llama_step(run: Run, vocab: int, tokens: int) -> dict:
    """plain, snippet FGM and fastadv FGM steps of one model and optimizer, timed in turns, then their peaks."""
    s = run.sizes
    hidden, layers, intermediate, seq = s.llama
    model = llama_lm(vocab, hidden, layers, intermediate, seq, run.device, s.dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (tokens // seq, seq), generator=gen).to(run.device)
    # One model for the three (three copies would not fit): fastadv's hooks, attached before the first
    # forward as they must be, cost the other two one tensor hook and a list append per step.
    fgm, snippet = FGM(model, EPSILON), SnippetFGM(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=run.device.type == "cuda")

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    # Agreement first, on the same weights and gradient: the adversarial losses of snippet and fastadv.
    optimizer.zero_grad(set_to_none=True)
    clean = loss()
    clean.backward()
    table = model.get_input_embeddings().weight
    before = table.detach().clone()
    adversarial = {}
    for impl, attack, restore in (
        ("snippet", lambda: snippet.attack(EPSILON, LLAMA_EMB_NAME), lambda: snippet.restore(LLAMA_EMB_NAME)),
        ("fastadv", lambda: fgm.attack(EPSILON), fgm.restore),
    ):
        attack()
        with torch.no_grad():
            adversarial[impl] = loss().item()
        restore()
        assert_restored(table, before, f"{impl} on the Llama step")
    del before
    increase = {impl: value - clean.item() for impl, value in adversarial.items()}
    assert all(math.isfinite(v) for v in increase.values()), f"adversarial losses not finite: {adversarial}"
    agreement = f"adversarial loss - clean: snippet {increase['snippet']:.3g}, fastadv {increase['fastadv']:.3g}"
    log(f"  {agreement} (clean {clean.item():.4f})")
    del clean

    def step(impl: str) -> Callable[[], None]:
        def run_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            if impl == "snippet":
                snippet.attack(EPSILON, LLAMA_EMB_NAME)
                loss().backward()
                snippet.restore(LLAMA_EMB_NAME)
            elif impl == "fastadv":
                fgm.attack(EPSILON)
                loss().backward()
                fgm.restore()
            optimizer.step()

        return run_step

    steps = {impl: step(impl) for impl in ("plain", "snippet", "fastadv")}
    times = interleaved_medians(steps, run.device, s.repeats)
    resident = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None  # CPU: no counter
    peaks = {impl: peak_memory_bytes(fn, run.device) for impl, fn in steps.items()}
    return {"times": times, "peaks": peaks, "resident": resident, "agreement": agreement, "backend": fgm.backend}


def peak_bytes(result: dict, impl: str) -> int | None:
    """A step's absolute peak: what was allocated before it (weights, gradients, AdamW states) plus its
    peak above that. None on a CPU, which has no allocation counter."""
    return None if result["resident"] is None else result["resident"] + result["peaks"][impl]


def part_step(run: Run) -> str:
    """llama_step per configuration, smallest estimate first; those that cannot fit, or run out of
    memory, or start after the budget, are recorded with their reason and skipped."""
    s = run.sizes
    hidden, layers, intermediate, seq = s.llama
    dtype_bytes = torch.finfo(s.dtype).bits // 8
    total_memory = torch.cuda.get_device_properties(run.device).total_memory if run.device.type == "cuda" else None
    if run.quick:  # the plan of the full run, so the arithmetic is checked here too
        h, n_layers, inter, _ = FULL.llama
        print(f"plan of the GPU run: Llama {n_layers} x {h}, intermediate {inter}, bf16; runs under 85% of 139 GiB")
        for vocab, tokens in FULL.step_configs:
            estimate = llama_step_estimate(vocab, tokens, h, n_layers, inter, 2)
            fits = "runs" if gib(estimate["total"]) <= FIT_FRACTION * 139 else "skipped"
            print(f"  V={vocab} N={tokens}: {describe_estimate(estimate)}: {fits}")
    memory = f"{gib(total_memory):.1f} GiB" if total_memory is not None else "not checked on a CPU"
    log(
        f"Llama {layers} x {hidden} (intermediate {intermediate}), seq {seq}, {dtype_name(s.dtype)} weights and "
        f"AdamW states, epsilon {EPSILON}; device memory {memory}"
    )
    configs = sorted(
        s.step_configs, key=lambda c: llama_step_estimate(*c, hidden, layers, intermediate, dtype_bytes)["total"]
    )
    rows, results, skipped = [], [], []
    base = provenance(run.device) | {"benchmark": "gpu_llama_step", "model": "LlamaForCausalLM", "hidden": hidden}
    base |= {"layers": layers, "dtype": dtype_name(s.dtype), "repeats": s.repeats}
    for vocab, tokens in configs:
        estimate = llama_step_estimate(vocab, tokens, hidden, layers, intermediate, dtype_bytes)
        log(f"V={vocab} N={tokens}: {describe_estimate(estimate)}")
        config = base | {"vocab": vocab, "tokens": tokens, "estimated_peak_bytes": estimate["total"]}
        if total_memory is not None and estimate["total"] > FIT_FRACTION * total_memory:
            status = f"skipped: estimated peak {gib(estimate['total']):.0f} GiB > {FIT_FRACTION:.0%} of the device"
        elif run.over_budget(f"V={vocab} N={tokens}"):
            status = "skipped: part over its time budget"
        else:
            try:
                result = llama_step(run, vocab, tokens)
                status = "ok"
            except torch.OutOfMemoryError as err:
                status = f"oom: {str(err).splitlines()[0][:160]}"
        release(run.device)  # after the except block: the traceback no longer holds the step's tensors
        if status != "ok":
            log(f"  {status}")
            skipped.append(f"V={vocab} N={tokens} {status.split(':')[0]}")
            rows.append(config | {"impl": "all", "status": status, "notes": fastadv_revision()})
            continue
        times, peaks = result["times"], result["peaks"]
        results.append({"vocab": vocab, "tokens": tokens, **result})
        note = f"{fastadv_revision()}; fastadv backend {result['backend']}; {result['agreement']}"
        for impl in times:
            rows.append(
                config
                | {"impl": impl, "status": "ok", "median_s": f"{times[impl]:.6g}"}
                | {"vs_plain": f"{times[impl] / times['plain']:.4f}", "peak_bytes": peak_bytes(result, impl)}
                | {"peak_above_start_bytes": peaks[impl], "notes": note}
            )
    run.save("gpu_step.csv", rows, STEP_LAYOUT)
    run.plot_data["step"] = results
    print(f"\ntraining step (Llama {layers} x {hidden}, {dtype_name(s.dtype)}), median ms and x plain; peak GiB:")
    print(f"{'V':>8} {'tokens':>7} {'plain':>9} {'snippet':>16} {'fastadv':>16}   {'peak plain/snippet/fastadv':>27}")
    for r in results:
        t = r["times"]
        p = " ".join(f"{gib(b):>8.2f}" if (b := peak_bytes(r, impl)) is not None else "     n/a" for impl in t)
        print(
            f"{r['vocab']:>8} {r['tokens']:>7} {t['plain'] * 1e3:>9.1f} "
            f"{t['snippet'] * 1e3:>9.1f} ({t['snippet'] / t['plain']:.2f}x) {t['fastadv'] * 1e3:>9.1f} "
            f"({t['fastadv'] / t['plain']:.2f}x)   {p}"
        )
    parts = [
        f"V={r['vocab']} N={r['tokens']}: snippet {r['times']['snippet'] / r['times']['plain']:.2f}x, "
        f"fastadv {r['times']['fastadv'] / r['times']['plain']:.2f}x plain"
        for r in results[-2:]
    ]
    return "; ".join(parts + skipped) or "no configuration ran"


def part_cost(run: Run) -> str:
    """bench/step_cost.py on the device: plain, snippet, FGM, pgd.step, FreeLB, the penalty, rows vs dense."""
    shape = run.sizes.cost
    rows = bench_shape(shape, run.device, run.sizes.dtype, run.sizes.repeats, run.quick)
    run.save("gpu_step_cost.csv", rows, COST_LAYOUT)
    ratio = {(r["impl"], r["row_gradients"]): float(r["x_plain"]) for r in rows}
    return (
        f"{shape.name} {dtype_name(run.sizes.dtype)}: FGM {ratio[('fgm', 1)]:.2f}x plain with rows, "
        f"{ratio[('fgm', 0)]:.2f}x dense; snippet {ratio[('snippet', 1)]:.2f}x"
    )


# ---------------------------------------------------------------- pgd, gp


def compare_setup(run: Run, attention: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], dict]:
    """The smaller Llama of the pgd and gp parts, its batch's loss, and the CSV columns of its rows."""
    vocab, hidden, layers, intermediate, batch, seq = run.sizes.compare
    log(f"Llama {layers} x {hidden} (intermediate {intermediate}), V={vocab}, batch {batch}x{seq}, {attention}")
    base = llama_lm(vocab, hidden, layers, intermediate, seq, run.device, run.sizes.dtype, attention)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(run.device)
    columns = {"model": f"LlamaForCausalLM, {attention} attention", "vocab": vocab, "hidden": hidden}
    columns |= {"layers": layers, "tokens": batch * seq, "dtype": dtype_name(run.sizes.dtype)}
    return base, lambda model: model(input_ids=ids, labels=ids).loss, columns


def save_comparison(
    run: Run, benchmark: str, columns: dict, times: dict[str, float], peaks: dict[str, int], note: str
) -> None:
    """Print a comparison's times (and x plain) and peaks; append its rows to gpu_step.csv."""
    base = provenance(run.device) | {"benchmark": benchmark, "status": "ok", "repeats": run.sizes.repeats} | columns
    rows = [
        base | {"impl": impl, "median_s": f"{seconds:.6g}", "vs_plain": f"{seconds / times['plain']:.4f}"}
        | {"peak_above_start_bytes": peaks[impl], "notes": f"{fastadv_revision()}; {note}"}
        for impl, seconds in times.items()
    ]  # fmt: skip
    print(f"{'':>18}{'median ms':>11}{'x plain':>9}{'peak above start MiB':>22}")
    for impl, seconds in times.items():
        print(f"{impl:>18}{seconds * 1e3:>11.1f}{seconds / times['plain']:>8.2f}x{peaks[impl] / 2**20:>22.1f}")
    run.save("gpu_step.csv", rows, STEP_LAYOUT)


def part_pgd(run: Run) -> str:
    """compare_pgd (pgd.py) on the smaller Llama."""
    base, loss_of, columns = compare_setup(run, "sdpa")
    result = compare_pgd(base, loss_of, LLAMA_EMB_NAME, run.device, run.sizes.repeats)
    t, peaks, agreement = result["times"], result["peaks"], result["agreement"]
    save_comparison(run, "gpu_pgd_step", columns, t, peaks, f"K={K}; grad bytes copied {result['copied']}; {agreement}")
    ratio = peaks["fastadv_step"] / max(peaks["snippet"], 1)
    return f"pgd.step {t['fastadv_step'] / t['snippet']:.2f}x the snippet's time, {ratio:.2f}x its peak; {agreement}"


def part_gp(run: Run) -> str:
    """compare_gradient_penalty (gradient_penalty.py) on the smaller Llama, eager attention."""
    base, loss_of, columns = compare_setup(run, "eager")  # exact mode needs a double backward
    result = compare_gradient_penalty(base, loss_of, run.device, run.sizes.repeats)
    t, memory, agreement = result["times"], result["memory"], result["agreement"]
    save_comparison(run, "gpu_gradient_penalty_step", columns, t, memory, f"epsilon {GP_EPSILON}; {agreement}")
    ratio = memory["finite_difference"] / max(memory["exact"], 1)
    time_ratio = t["finite_difference"] / t["exact"]
    return f"finite difference {time_ratio:.2f}x exact's time, {ratio:.2f}x its memory; {agreement}"


# ---------------------------------------------------------------- kernels, segment


def median_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """CUDA: triton.testing.do_bench's median (CUDA events, warm-up, L2 flushed before each call). CPU:
    median wall clock of a few calls (the interpreter's or torch's: no bandwidth meaning)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    return median_seconds(fn, device, repeats=2, warmup=1)


def random_values(run: Run, rows: int, dim: int) -> tuple[torch.Generator, torch.Tensor]:
    """A generator on the device (seed 0) and random [rows, dim] values in the run's dtype: never zeros,
    which hide unwritten outputs and can run faster than real data."""
    gen = torch.Generator(run.device).manual_seed(0)
    return gen, torch.randn(rows, dim, device=run.device, dtype=run.sizes.dtype, generator=gen)


@dataclass
class KernelCase:
    """One op timed: the call, the fewest bytes it must move, what else it moves, its own CSV columns."""

    kernel: str
    call: Callable[[], object]
    min_bytes: int
    note: str = ""
    columns: dict = field(default_factory=dict)


def kernel_rows(run: Run, benchmark: str, cases: list[KernelCase], shape: dict, copy_bps: float) -> list[dict]:
    """Time each case; rows (``shape`` and the case's columns) with GB/s and the fraction of the copy
    bandwidth; print them."""
    backend = resolve_backend(run.device)
    meaning = "" if run.device.type == "cuda" else " (cpu: timings of the interpreter or torch, no bandwidth meaning)"
    print(f"{'kernel':<34}{'median us':>11}{'min MB':>10}{'GB/s':>9}{'of copy':>9}  {backend}{meaning}")
    rows = []
    for case in cases:
        seconds = median_call_seconds(case.call, run.device)
        bps = case.min_bytes / seconds
        print(
            f"{case.kernel:<34}{seconds * 1e6:>11.1f}{case.min_bytes / 1e6:>10.1f}{bps / 1e9:>9.1f}"
            f"{bps / copy_bps:>9.2f}"
        )
        rows.append(
            provenance(run.device)
            | {"benchmark": benchmark, "kernel": case.kernel, "backend": backend, **shape, **case.columns}
            | {"median_s": f"{seconds:.6g}", "min_bytes": case.min_bytes, "gb_per_s": f"{bps / 1e9:.1f}"}
            | {"copy_gb_per_s": f"{copy_bps / 1e9:.1f}", "fraction_of_copy": f"{bps / copy_bps:.3f}"}
            | {"notes": "; ".join(filter(None, (fastadv_revision(), case.note, meaning.strip())))}
        )
    return rows


def part_kernels(run: Run) -> str:
    """Each op on the rows of B*T uniform random ids of a V x d table (dense gradient, like .grad).

    Fewest bytes, e = the table's element size, U distinct rows, M = min(N, V) slots, N ids:
    sum of squares reads U x d gradient elements; backup+add reads U weight and U gradient rows and
    writes U backup and U weight rows (4 U d e); restore reads U backup rows and writes U weight rows;
    a PGD step (a later one: the clean rows saved) reads the weight, gradient and saved rows and
    writes the weight (4 U d e); the segment sum reads N value rows and writes U fp32 sums. Each adds
    its index reads (8 bytes per row id, 1 per flag). Timed through fastadv.ops' public launchers, so
    a launcher's own work (a zero-filled backup, PGD's intermediate r) counts against its kernel.
    """
    vocab, dim, positions = run.sizes.kernels
    device, dtype = run.device, run.sizes.dtype
    backend, e = resolve_backend(device), torch.finfo(dtype).bits // 8
    gen, weight = random_values(run, vocab, dim)
    grad = torch.randn(vocab, dim, device=device, dtype=dtype, generator=gen)
    values = torch.randn(positions, dim, device=device, dtype=dtype, generator=gen)
    ids = torch.randint(0, vocab, (positions,), device=device, generator=gen)
    row_set = row_set_from_ids(ids, num_rows=vocab, static_shape=True)
    slots, distinct = len(row_set), torch.unique(ids).numel()
    norm = rows_l2_norm(grad, row_set, backend)
    ok = torch.ones((), dtype=torch.bool, device=device)
    backup = rows_backup_add(weight, grad, row_set, norm, ok, EPSILON, backend=backend)
    rows_restore(weight, backup, row_set, backend)
    copy_bps = run.copy_bandwidth()
    log(f"V={vocab} d={dim} {dtype_name(dtype)}; {positions} uniform random ids: {distinct} distinct, {slots} slots")
    row_bytes = distinct * dim * e
    cases = [
        KernelCase("rows sum of squares", lambda: rows_l2_norm(grad, row_set, backend), row_bytes + 9 * slots, ""),
        KernelCase(
            "backup + add",
            lambda: rows_backup_add(weight, grad, row_set, norm, ok, EPSILON, backend=backend),
            4 * row_bytes + 17 * slots,
            "through the public launcher: its own buffers (a zero-filled backup) count too",
        ),
        KernelCase("restore", lambda: rows_restore(weight, backup, row_set, backend), 2 * row_bytes + 9 * slots, ""),
        KernelCase(
            "PGD step (later step)",
            lambda: rows_pgd_step(weight, grad, row_set, backup, norm, ok, ALPHA, EPSILON, backend),
            4 * row_bytes + 17 * slots,
            "two kernels: the displacement r is written and read back, the weight read twice (8 U d e in all)",
        ),
        KernelCase(
            "segment sum (uniform ids)",
            lambda: segment_sum_by_id(values, ids, num_rows=vocab, static_shape=True, backend=backend),
            positions * dim * e + distinct * dim * 4 + 8 * positions + 16 * slots,
            "includes the sort of the ids and the slot layout",
        ),
    ]
    shape = {"ids": "uniform", "vocab": vocab, "dim": dim, "dtype": dtype_name(dtype), "positions": positions}
    rows = kernel_rows(run, "gpu_kernel_bandwidth", cases, shape | {"distinct_rows": distinct}, copy_bps)
    rows_restore(weight, backup, row_set, backend)  # leave nothing half done (the tensors die here anyway)
    run.save("gpu_kernels.csv", rows, KERNEL_LAYOUT)
    run.plot_data["kernels"] = rows
    fractions = ", ".join(f"{r['kernel'].split(' (')[0]} {float(r['fraction_of_copy']):.2f}" for r in rows)
    return f"fraction of copy bandwidth ({copy_bps / 1e9:.0f} GB/s): {fractions}" + (
        "" if device.type == "cuda" else " (cpu: meaningless)"
    )


def part_segment(run: Run) -> str:
    """segment_sum_by_id (static path) on N positions: uniform ids; one id at half of the positions and
    uniform elsewhere, as a frequent token; the same with that id as padding_idx (its run is not read).

    Fewest bytes: the value rows read (the padding run's are not), U fp32 sums written, the sorted
    order (8 bytes per position) and each slot's run bounds (16 bytes per slot)."""
    vocab, dim, positions = run.sizes.segment
    device, dtype = run.device, run.sizes.dtype
    backend, e = resolve_backend(device), torch.finfo(dtype).bits // 8
    gen, values = random_values(run, positions, dim)
    uniform = torch.randint(1, vocab, (positions,), device=device, generator=gen)
    skewed = uniform.clone()
    skewed[torch.randperm(positions, device=device, generator=gen)[: positions // 2]] = 0
    copy_bps = run.copy_bandwidth()
    log(f"N={positions} positions, V={vocab}, d={dim} {dtype_name(dtype)}")
    shape = {"vocab": vocab, "dim": dim, "dtype": dtype_name(dtype), "positions": positions}
    cases = []
    for label, ids, padding, note in (
        ("uniform", uniform, None, "ids uniform in [1, V)"),
        ("skewed", skewed, None, "id 0 at half of the positions, no padding_idx"),
        ("skewed, padding_idx", skewed, 0, "id 0 at half of the positions, padding_idx=0"),
    ):
        distinct = torch.unique(ids).numel()
        read = positions // 2 if padding is not None else positions
        min_bytes = read * dim * e + distinct * dim * 4 + 8 * positions + 16 * min(positions, vocab)

        def call(ids: torch.Tensor = ids, padding: int | None = padding) -> object:
            return segment_sum_by_id(
                values, ids, num_rows=vocab, padding_idx=padding, static_shape=True, backend=backend
            )

        columns = {"ids": label, "distinct_rows": distinct}
        cases.append(KernelCase(f"segment sum ({label})", call, min_bytes, note, columns))
    rows = kernel_rows(run, "gpu_segment_skew", cases, shape, copy_bps)
    run.save("gpu_kernels.csv", rows, KERNEL_LAYOUT)
    t = {r["ids"]: float(r["median_s"]) for r in rows}
    return (
        f"uniform {t['uniform'] * 1e6:.0f} us, skewed {t['skewed'] * 1e6:.0f} us "
        f"({t['skewed'] / t['uniform']:.1f}x), skewed with padding_idx {t['skewed, padding_idx'] * 1e6:.0f} us"
    )


# ---------------------------------------------------------------- plot


def plot(run: Run) -> Path | None:
    """attack+restore time and memory against V, step time against plain, kernel bandwidth fractions."""
    if not run.plot_data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_time, ax_mem), (ax_step, ax_kernel) = axes
    attack, steps, kernels = (run.plot_data.get(key, []) for key in ("attack", "step", "kernels"))
    for ax, key, scale, label in ((ax_time, "_s", 1e3, "attack+restore (ms)"), (ax_mem, "_mem", 2**-20, "MiB")):
        for impl, style in (("snippet", "o-"), ("fastadv", "s-")):
            ax.plot([r["vocab"] for r in attack], [r[impl + key] * scale for r in attack], style, label=impl)
        ax.set(xscale="log", yscale="log", xlabel="vocabulary V", ylabel=label)
        ax.grid(alpha=0.3)
    ax_time.set_title(f"attack+restore, {dtype_name(run.sizes.dtype)} table x {run.sizes.attack_dim}")
    ax_mem.set_title("extra memory of attack()")
    for i, impl in enumerate(("snippet", "fastadv")):
        ratios = [r["times"][impl] / r["times"]["plain"] for r in steps]
        ax_step.bar([x + 0.4 * i for x in range(len(steps))], ratios, width=0.4, label=impl)
    ax_step.axhline(2.0, color="gray", linestyle="--", label="2 x plain (the extra pass)")
    labels = [f"V={r['vocab']}\nN={r['tokens']}" for r in steps]
    ax_step.set(xticks=[x + 0.2 for x in range(len(steps))], xticklabels=labels, ylabel="step time / plain step")
    ax_step.set_title("Llama training step with FGM")
    ax_kernel.barh([r["kernel"] for r in kernels], [float(r["fraction_of_copy"]) for r in kernels])
    ax_kernel.set(xlabel="achieved / copy bandwidth (fewest bytes)", xlim=(0, 1.05))
    ax_kernel.set_title("kernels" + ("" if run.device.type == "cuda" else " (cpu: meaningless)"))
    for ax, data in ((ax_time, attack), (ax_mem, attack), (ax_step, steps), (ax_kernel, kernels)):
        if not data:
            ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", va="center", color="gray")
        elif ax is not ax_kernel:
            ax.legend()
    fig.suptitle(f"fastadv on {device_description(run.device)}, {fastadv_revision()}")
    fig.tight_layout()
    path = run.out / f"gpu_{run.device.type}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


class Tee:
    """Writes to several text streams at once (the console and gpu_run.log)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name: str) -> object:  # isatty, fileno, encoding...: the console's
        return getattr(self.streams[0], name)


@contextlib.contextmanager
def output_dir(out: str | None, quick: bool) -> Iterator[Path]:
    """--out, else bench/results; --quick without --out writes to a temporary folder, removed afterwards."""
    if out is None and quick:
        with tempfile.TemporaryDirectory(prefix="fastadv-gpu-quick-") as tmp:
            yield Path(tmp)
        return
    path = Path(out) if out is not None else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    yield path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; --parts keeps PARTS' order; a full run without CUDA is refused."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU, CI): about a minute, nothing saved")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--skip-tests", action="store_true", help="leave the test suite out")
    parser.add_argument("--out", help="results folder (default bench/results; --quick: a temporary one)")
    parser.add_argument("--tests-timeout", type=int, help="seconds the test suite may take (default 540)")
    parser.add_argument("--tests-workers", type=int, default=0, help="pytest-xdist workers (default: serial)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts and not (p == "tests" and args.skip_tests)]
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device: the full run needs one (on a CPU, run with --quick)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the parts, plot, print the summary; the exit code: 1 when a part failed, else 0."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a CI machine's other jobs stall multithreaded ops (see snippet_vs_fastadv.py)
    sizes = QUICK if args.quick else FULL
    if args.tests_timeout:
        sizes = Sizes(**{**sizes.__dict__, "tests_timeout_s": args.tests_timeout})
    results: list[PartResult] = []
    with output_dir(args.out, args.quick) as out, (out / "gpu_run.log").open("w", buffering=1) as run_log:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(stdout, run_log), Tee(stderr, run_log)
        try:
            run = Run(device, sizes, out, args.quick, args.tests_workers)
            env = environment()
            log(f"{device_description(device)}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
            log(f"{fastadv_revision()}; parts {','.join(args.parts)}; results in {out}")
            results = run_parts(run, args.parts, args.skip_tests)
            try:
                png = plot(run)
                if png is not None:
                    log(f"plot {png}")
            except Exception:  # a plot must not hide the results
                traceback.print_exc(file=sys.stdout)
                results.append(PartResult("plot", "FAILED", 0.0, "see the traceback above"))
            if args.quick and args.out is None:
                log("quick run: written to a temporary folder only, removed now; nothing saved under bench/results")
            print_summary(results, run)
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The checks bench/gpu.py runs on the device: the test suite, no host sync, CUDA graphs."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import log, relative_grad_difference
from measure import synchronize
from pgd import ALPHA, K
from torch import nn

from fastadv import FGM, PGD, GradientPenalty
from fastadv.ops import resolve_backend
from gpu_parts.run import EPSILON, NeedsCuda, PartFailed, Run
from gpu_parts.step import assert_restored

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "tests"))  # appended: bench's own modules come first
from sync_checks import host_syncs_forbidden, static_row_sets  # noqa: E402


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


def assert_attack_changed(perturbed: torch.Tensor, clean: torch.Tensor, what: str) -> None:
    """A check that proves something: the attack moved the embedding (any shape, compared bitwise)."""
    assert not torch.equal(perturbed, clean), f"{what}: the attack changed nothing, so the check would prove nothing"


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

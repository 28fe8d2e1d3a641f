"""The checks bench/gpu.py runs on the device, all of them tests: the suite, no host sync, CUDA graphs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from common import log

from gpu_parts.run import NeedsCuda, PartFailed, Run

ROOT = Path(__file__).resolve().parents[2]  # pytest runs from the repository's root


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


def run_pytest(run: Run, args: tuple[str, ...], log_name: str, timeout_s: float) -> str:
    """pytest on ``args`` in a subprocess with a timeout (conftest picks CUDA when there is one and adds
    the bf16/fp16 kernel cases); full output in ``log_name`` under --out, the counts returned."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    if run.tests_workers:  # pytest-xdist; one file per worker, so a file's distributed tests never overlap
        command += ["-n", str(run.tests_workers), "--dist", "loadfile"]
    log_path = run.out / log_name
    log(f"{' '.join(command[1:])} (timeout {timeout_s:.0f} s), output in {log_path}")
    with log_path.open("w") as output:
        # A session of its own: on a timeout, its whole process group (distributed workers too) is killed.
        proc = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
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
        raise PartFailed(f"timed out after {timeout_s:.0f} s ({counts} so far; see {log_path.name})")
    if returncode != 0:
        raise PartFailed(f"pytest exit code {returncode}: {counts}")
    return counts


def part_tests(run: Run) -> str:
    """The test suite (--quick: one file, so that this runner cannot rot; CI runs the suite)."""
    counts = run_pytest(run, run.sizes.tests, "gpu_tests.log", run.sizes.tests_timeout_s)
    return counts + (" (quick: " + " ".join(run.sizes.tests) + " only; CI runs the suite)" if run.quick else "")


def part_sync(run: Run) -> str:
    """tests/test_sync_free.py on the device: FGM (weight, output with shared rows and per position), PGD's
    first and later attacks, the gradient penalty's own part, each under a guard that makes any host sync
    raise (on CUDA also torch.cuda.set_sync_debug_mode("error")); each checks that the attack changed
    something and that restore put the weights back bit for bit."""
    timeout_s = run.sizes.budgets_s.get("sync", run.sizes.tests_timeout_s)
    return run_pytest(run, ("tests/test_sync_free.py",), "gpu_sync.log", timeout_s) + " sync-free"


def part_graph(run: Run) -> str:
    """tests/test_cuda_graphs.py on the device: FGM's step captured in a CUDA graph, replayed on a new
    batch, equal to the eager step (weight and output targets). On a CPU the same comparison runs
    eagerly and the part reports "needs CUDA"."""
    timeout_s = run.sizes.budgets_s.get("graph", run.sizes.tests_timeout_s)
    counts = run_pytest(run, ("tests/test_cuda_graphs.py",), "gpu_graph.log", timeout_s)
    if run.device.type != "cuda":
        raise NeedsCuda(f"CUDA graphs need a CUDA device (the same comparison, run eagerly: {counts})")
    return counts + ": replays on a new batch equal the eager step"

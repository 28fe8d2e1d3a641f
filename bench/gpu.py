"""One command that proves and measures fastadv on a GPU: the tests, no host sync, CUDA graphs, speed and memory.

    python bench/gpu.py                              # CUDA: every part; CSVs appended under bench/results
    python bench/gpu.py --out "$OUT"                 # the same, results under $OUT (the device tool's folder)
    python bench/gpu.py --parts sync,graph,attack    # a subset, e.g. to rerun one part on a short lease
    python bench/gpu.py --skip-tests                 # every part but the test suite
    python bench/gpu.py --quick                      # CPU (CI): tiny sizes, about a minute, nothing saved
    TRITON_INTERPRET=1 python bench/gpu.py --quick   # the same, the Triton kernels interpreted on CPU

Parts, in order (each timed and budgeted; a part that fails is recorded and the others still run; the
exit code is 1 when any part failed; "needs CUDA" and "skipped" are not failures):

    sync     tests/test_sync_free.py: attack and restore under a guard that makes any host sync raise (on
             CUDA also torch.cuda.set_sync_debug_mode("error")): FGM weight mode, output mode with shared
             rows and per position; PGD first and later attack; the gradient penalty's own part. Each case
             also checks that the attack changed something and that restore put the weights back bit for bit.
    graph    tests/test_cuda_graphs.py: FGM's clean pass, attack, adversarial pass and restore captured in a
             torch.cuda.CUDAGraph, replayed on a new batch, compared with the same step run eagerly. Needs
             CUDA; on a CPU the same comparison runs eagerly, so that it cannot rot.
    attack   attack+restore time and extra memory, the copied snippet vs fastadv.FGM, bf16 tables.
    step     a whole training step of a Llama-shaped model (plain, snippet FGM, fastadv FGM, AdamW, bf16):
             time relative to the plain step and peak memory; configurations that cannot fit are skipped.
    cost     bench/step_cost.py on a Qwen2-like model (V = 151,936, d = 4096, 2 layers, bf16, 4 x 1024
             tokens, fused AdamW): plain, snippet FGM, FGM.step, pgd.step, FreeLB, the gradient penalty,
             each fastadv step with the table's gradient added as rows and with torch's dense backward.
    host     bench/host_cost.py on the device: step time and ops per step, fastadv against the snippet (FGM,
             the PGD loop) and R3F's inputs_embeds reference, at BERT-base's shape (V = 21,128, d = 768, 12
             layers, bf16, batch 16 x 128 and 32 x 128), where a step is launch-bound; FGM at the cost part's
             Qwen2 shape (batch 4 x 1024).
    pgd      PGD K=3: the snippet's loop, fastadv's drop-in calls and pgd.step, on a smaller Llama.
    gp       the gradient penalty, finite difference vs exact (eager attention), on the same smaller Llama.
    kernels  each Triton kernel's achieved bandwidth as a fraction of the measured copy bandwidth.
    segment  the segment sum with skewed ids (one id at half of the positions, as padding is) vs uniform.
    tests    the test suite (python -m pytest -q) in a subprocess with a timeout, its output in
             gpu_tests.log; conftest picks CUDA and adds the bf16/fp16 kernel cases. Last, so that a run
             cut short has saved every measurement. --quick runs tests/ops/test_launch.py only (CI runs
             the suite), so that this runner cannot rot.

Results: gpu_attack.csv, gpu_step.csv, gpu_step_cost.csv, gpu_host_cost.csv, gpu_kernels.csv (appended, with
device, versions, commit and date), gpu_<device type>.png, gpu_sync.log, gpu_graph.log, gpu_tests.log (pytest's
output) and gpu_run.log (this output) under --out. A compact summary table is printed last. The parts live in
bench/gpu_parts/ (one module per kind: checks, attack, step, host, compare, kernels, plot; run.py holds the
sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import torch
from common import RESULTS, fastadv_revision, log, release
from gpu_parts.attack import part_attack
from gpu_parts.checks import part_graph, part_sync, part_tests
from gpu_parts.compare import part_gp, part_pgd
from gpu_parts.host import part_host
from gpu_parts.kernels import part_kernels, part_segment
from gpu_parts.plot import plot
from gpu_parts.run import FULL, QUICK, NeedsCuda, PartFailed, PartResult, Run, Sizes
from gpu_parts.step import part_cost, part_step
from measure import device_description, environment

# The suite runs last: a run cut short (a lease's time limit) has then saved every measurement, and
# pytest's log so far.
PARTS = ("sync", "graph", "attack", "step", "cost", "host", "pgd", "gp", "kernels", "segment", "tests")


def run_parts(run: Run, parts: list[str], skip_tests: bool) -> list[PartResult]:
    """Run ``parts`` in order, each caught, timed and budgeted; the others are listed as skipped."""
    functions: dict[str, Callable[[Run], str]] = {
        "tests": part_tests, "sync": part_sync, "graph": part_graph, "attack": part_attack, "step": part_step,
        "cost": part_cost, "host": part_host, "pgd": part_pgd, "gp": part_gp, "kernels": part_kernels,
        "segment": part_segment,
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

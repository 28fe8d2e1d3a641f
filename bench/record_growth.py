"""The recorded rows over a long run with zero_grad(set_to_none=False), beside set_to_none=True, in one run.

fastadv records the token ids of each lookup whose gradient reaches the table, and attack() works on
those rows. Older scripts zero the gradients in place (``zero_grad(set_to_none=False)``): the record
must restart there as it does when ``.grad`` is set to None, or attack() touches every row seen since
the start, and its time and memory grow with the run. This trains two copies of a random BERT (a
30522 x 64 table) with FGM and the snippet's calls, one zeroing in place and one setting to None,
step by step in turns on the same random batches, and reports, over a window of steps ending near
step 500 and one ending at step 2000 (medians over 100 steps):

- attack+restore time: each step of a window times 5 attack+restore pairs after its clean backward
  and keeps the fastest (the least disturbed by other jobs), then the median over the window;
- the ids the record holds (what attack() sorts into rows);
- the bytes attack() allocates (CPU: summed over the call's allocations; CUDA: its peak above the
  start), on the last steps of each window, which are left out of the timing;
- the process's resident memory (both models together) and, on CUDA, the allocator's;

then the ratios (step 2000 / step 500) and whether the two runs end with the same weights.

On CPU it runs one thread by default: on a CPU shared with other jobs, torch's intra-op threads wait
for a busy core at every op (a 3 ms step then takes 100s of ms now and then), which would drown a
ratio of two medians; the thread count is part of the device column.

    python bench/record_growth.py               # 2000 steps each; appends rows to bench/results/record_growth.csv
    python bench/record_growth.py --steps 4000 --window 100
    python bench/record_growth.py --quick       # 60 steps of a smaller model, prints only (CI)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from common import (
    RESULTS,
    Layout,
    append_rows,
    bert_classifier,
    fastadv_revision,
    load_average,
    log,
    provenance,
)
from measure import device_description, extra_memory_bytes, synchronize

from fastadv import FGM

CSV_PATH = RESULTS / "record_growth.csv"
LAYOUT = Layout(
    config=("vocab", "dim", "batch", "zero_grad", "window_end_step", "window_steps"),
    metrics=("attack_restore_median_s", "recorded_ids", "attack_bytes", "rss_bytes", "allocated_bytes"),
)
EPSILON = 1.0
MEMORY_STEPS = 3  # the last steps of each window: attack() under the profiler (CPU), so not timed
PAIRS = 5  # attack+restore pairs timed per step of a window, the fastest kept (the least disturbed)
FLAT = 0.05  # "flat": step 2000 within 5% of step 500


def resident_bytes() -> int:
    """The process's resident set size (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class Run:
    """One model, its AdamW and FGM, zeroing its gradients one way; what each window measured."""

    def __init__(self, base: torch.nn.Module, set_to_none: bool, device: torch.device) -> None:
        self.name = f"set_to_none={set_to_none}"
        self.set_to_none, self.device = set_to_none, device
        self.model = copy.deepcopy(base)
        self.fgm = FGM(self.model)  # before the first forward pass: it hooks the embedding
        self.recorder = self.fgm._recorders[id(self.model.get_input_embeddings().weight)]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.counts: list[int] = []
        self.attack_bytes: list[int] = []

    def step(self, batch: dict[str, torch.Tensor], measure: str | None) -> None:
        """Clean backward, attack, adversarial backward, restore, optimizer step, zero_grad.

        ``measure``: "time" first times PAIRS attack+restore pairs after the clean backward and keeps
        the least disturbed; "memory" takes attack()'s memory; either records the record's size."""
        self.model(**batch).loss.backward()
        if measure == "time":
            self.times.append(min(self._attack_restore_seconds() for _ in range(PAIRS)))
        if measure == "memory":
            self.attack_bytes.append(extra_memory_bytes(lambda: self.fgm.attack(EPSILON), self.device))
        else:
            self.fgm.attack(EPSILON)
        self.model(**batch).loss.backward()
        self.fgm.restore()
        if measure is not None:
            self.counts.append(self.recorder.count)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.set_to_none)

    def _attack_restore_seconds(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.fgm.attack(EPSILON)
        self.fgm.restore()
        synchronize(self.device)
        return time.perf_counter() - start

    def window(self) -> dict[str, float]:
        """Medians since the last call, then forgets them."""
        result = {
            "time": statistics.median(self.times),
            "ids": statistics.median(self.counts),
            "attack_bytes": statistics.median(self.attack_bytes),
            "timed": len(self.times),
        }
        self.times, self.counts, self.attack_bytes = [], [], []
        return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--window", type=int, default=100, help="steps per window (medians)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1: see above)")
    p.add_argument("--quick", action="store_true", help="60 steps of a smaller model, nothing saved")
    p.add_argument("--no-save", action="store_true", help="print only: no CSV rows")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.window, args.vocab, args.hidden, args.layers, args.batch, args.seq = 60, 10, 3000, 32, 1, 4, 16
    if args.window <= MEMORY_STEPS or 4 * args.window > args.steps:
        p.error(f"--window must be above {MEMORY_STEPS} and at most a quarter of --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    desc = device_description(device)
    shape = f"BERT {args.layers}x{args.hidden}, V={args.vocab}, batch {args.batch}x{args.seq}"
    log(f"{shape}, {args.steps} steps each, FGM eps={EPSILON}, windows of {args.window}; {desc}; {fastadv_revision()}")
    base = bert_classifier(args.vocab, args.hidden, args.layers, args.seq, device)
    runs = [Run(base, False, device), Run(base, True, device)]
    del base
    ends = (args.steps // 4, args.steps)  # the windows end at step 500 and step 2000
    gen = torch.Generator().manual_seed(1)
    windows: dict[int, dict] = {}
    before = load_average()
    start = time.perf_counter()
    for i in range(args.steps):
        batch = {
            "input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device),
            "labels": torch.randint(0, 2, (args.batch,), generator=gen).to(device),
        }
        end = next((e for e in ends if e - args.window <= i < e), None)
        measure = None if end is None else "memory" if i >= end - MEMORY_STEPS else "time"
        for run in runs if i % 2 == 0 else reversed(runs):  # in turns: a change of load falls on both
            run.step(batch, measure)
        if end is not None and i == end - 1:
            allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            windows[end] = {"rss": resident_bytes(), "allocated": allocated} | {r.name: r.window() for r in runs}
            log(f"  step {end}: " + ", ".join(f"{r.name} {1e3 * windows[end][r.name]['time']:.2f} ms" for r in runs))
    elapsed = time.perf_counter() - start
    load = f"loadavg(1min) before/after={before:.2f}/{load_average():.2f}; steps in turns"

    weights = [torch.cat([p.detach().flatten() for p in r.model.parameters()]).double() for r in runs]
    diff = ((weights[0] - weights[1]).norm() / weights[1].norm()).item()
    agree = "bitwise equal" if torch.equal(weights[0], weights[1]) else f"relative difference {diff:.2e}"

    first, last = windows[ends[0]], windows[ends[1]]
    print(f"\nFGM over {args.steps} steps, {shape}, on {desc} (medians over {args.window} steps):")
    print(f"{'':>18}{'step':>6}{'attack+restore ms':>19}{'recorded ids':>14}{'attack() MiB':>14}")
    for run in runs:
        for end in ends:
            w = windows[end][run.name]
            print(f"{run.name:>18}{end:>6}{1e3 * w['time']:>19.3f}{w['ids']:>14.0f}{w['attack_bytes'] / 2**20:>14.2f}")
    ratios = {}
    for run in runs:
        a, b = first[run.name], last[run.name]
        ratios[run.name] = {k: b[k] / a[k] if a[k] else float("nan") for k in ("time", "ids", "attack_bytes")}
        r = ratios[run.name]
        print(
            f"{run.name:>18} step {ends[1]} / step {ends[0]}: time {r['time']:.3f}x, recorded ids "
            f"{r['ids']:.3f}x, attack() memory {r['attack_bytes']:.3f}x"
        )
    # A change of load on a shared machine moves both runs' times alike (they run in turns): the time of
    # set_to_none=False relative to set_to_none=True's, at each window, shows what is its own.
    kept, dropped = ratios["set_to_none=False"], ratios["set_to_none=True"]
    relative = kept["time"] / dropped["time"]
    print(f"set_to_none=False time relative to set_to_none=True's, step {ends[1]} / step {ends[0]}: {relative:.3f}x")
    flat = {
        "recorded ids": abs(kept["ids"] - 1) <= FLAT,
        "attack() memory": abs(kept["attack_bytes"] - 1) <= FLAT,
        "time": abs(kept["time"] - 1) <= FLAT,
        "time relative to set_to_none=True": abs(relative - 1) <= FLAT,
    }
    rss = f"process resident memory (both runs): {first['rss'] / 2**20:.0f} -> {last['rss'] / 2**20:.0f} MiB"
    if first["rss"]:
        rss += f" ({last['rss'] / first['rss']:.3f}x)"
    if first["allocated"] is not None:
        rss += f"; allocated {first['allocated'] / 2**20:.0f} -> {last['allocated'] / 2**20:.0f} MiB"
    print(rss)
    print(f"final weights, set_to_none=False vs True: {agree}")
    verdicts = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in flat.items())
    print(f"set_to_none=False flat within {FLAT:.0%} from step {ends[0]} to step {ends[1]}: {verdicts}")
    if args.quick:
        print(f"(--quick: windows of {args.window} steps, a smoke run; its times say nothing)")
    log(f"done in {elapsed:.0f} s")

    if args.quick or args.no_save:
        log("quick / --no-save run: nothing written")
        return
    base_row = provenance(device) | {"benchmark": "record_growth", "impl": "fastadv FGM"}
    base_row |= {"vocab": args.vocab, "dim": args.hidden}
    notes = f"{args.layers} layers; {fastadv_revision()}; final weights False vs True: {agree}; rss = both runs; {load}"
    rows = [
        base_row
        | {
            "batch": f"{args.batch}x{args.seq}",
            "zero_grad": run.name,
            "window_end_step": end,
            "window_steps": windows[end][run.name]["timed"],
            "attack_restore_median_s": f"{windows[end][run.name]['time']:.6g}",
            "recorded_ids": f"{windows[end][run.name]['ids']:.0f}",
            "attack_bytes": f"{windows[end][run.name]['attack_bytes']:.0f}",
            "rss_bytes": windows[end]["rss"],
            "allocated_bytes": "" if windows[end]["allocated"] is None else windows[end]["allocated"],
            "notes": notes,
        }
        for run in runs
        for end in ends
    ]
    append_rows(rows, CSV_PATH, LAYOUT)
    log(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    main()

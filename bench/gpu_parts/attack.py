"""The attack part: attack+restore time and extra memory, the copied snippet vs fastadv.FGM."""

from __future__ import annotations

from common import SHAPE_LAYOUT, fastadv_revision, result_rows
from snippet_vs_fastadv import bench_attack

from gpu_parts.run import Run, dtype_name


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

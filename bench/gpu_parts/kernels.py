"""The kernels and segment parts: each Triton kernel's bandwidth against a copy's, the skewed segment sum."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from common import Layout, fastadv_revision, log, provenance
from pgd import ALPHA

from fastadv.ops import (
    resolve_backend,
    row_set_from_ids,
    rows_backup_add,
    rows_l2_norm,
    rows_pgd_step,
    rows_restore,
    segment_sum_by_id,
)
from gpu_parts.run import EPSILON, Run, dtype_name, median_call_seconds

KERNEL_LAYOUT = Layout(
    config=("backend", "ids", "vocab", "dim", "dtype", "positions", "distinct_rows"),
    metrics=("median_s", "min_bytes", "gb_per_s", "copy_gb_per_s", "fraction_of_copy"),
    impl="kernel",
)


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

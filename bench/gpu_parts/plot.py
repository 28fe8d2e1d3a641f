"""The plot of a GPU run: attack+restore against V, the step against plain, the kernels' bandwidth."""

from __future__ import annotations

from pathlib import Path

from common import fastadv_revision
from measure import device_description

from gpu_parts.run import Run, dtype_name


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

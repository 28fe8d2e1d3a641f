"""fastadv in one run: the copied FGM snippet vs ``fastadv.FGM``, same training, same numbers, less cost.

A small BERT text classifier (random weights, built from a config: nothing is downloaded) with a
large vocabulary is trained three times on a synthetic task, from the same initial weights and on
the same batches. The task: sequences of random token ids, labelled 0 or 1, in which half the positions
hold one of four "signal" tokens of the label (ids 2-5 for label 0, 6-9 for label 1); the model must find
them among the random ones. The runs:

  plain        no adversary: the cost floor;
  snippet FGM  the FGM snippet copied across fine-tuning scripts (``fastadv.snippets.SnippetFGM``),
               which clones, normalizes and perturbs the whole V x d embedding table at every step;
  fastadv FGM  the same loop with ``FGM(model)`` swapped in: same calls, same numbers, but only the
               rows of the batch's tokens are touched.

The three runs are timed in turns, one step of each at a time (plain, snippet, fastadv, then the other
way round), so that a machine that is busy for a while slows all three alike. It prints, per run, the
median training step time, the time and extra memory of one attack and the eval accuracy, and checks that
the snippet and fastadv end with the same weights (exit status 1 if not).

fastadv also spells the same step without the snippet's calls: ``fgm.step(lambda: model(**batch).loss)``
runs both passes, or ``with fgm.perturbed(): model(**batch).loss.backward()`` wraps the adversarial one.

Run it (about 1-3 minutes on a 2-core CPU; on a GPU if there is one):

    python examples/demo.py
    python examples/demo.py --vocab 250000 --steps 60 --device cuda
    python examples/demo.py --quick    # seconds: a 4,000-token vocabulary, 6 steps (CI runs it)
"""

from __future__ import annotations

import os

# The extra memory of an attack is read off torch's profiler (bench/measure.py), which logs its start and stop on
# stderr at each use and warns about memory allocated before it started: lines that read as errors and are
# not. Set before torch is imported, where these are read; a value of yours is kept.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from fastadv import FGM
from fastadv.snippets import SnippetFGM

# The measurements (time, extra memory, provenance) are bench/measure.py's: the demo reports what the benchmarks do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from measure import device_description, environment, extra_memory_bytes, median_seconds, synchronize

EMB_NAME = "word_embeddings"  # as the snippet is called for BERT: bert.embeddings.word_embeddings.weight
MAX_REL_DIFF = 1e-5  # how far apart the snippet's and fastadv's final weights may end (fp32)

Batch = dict[str, torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128000, help="vocabulary size V (the snippet costs V x d)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size d")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--epsilon", type=float, default=1.0, help="FGM perturbation size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a 4,000-token vocabulary and 6 steps: seconds")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.steps = 4000, 6
    return args


# ---------------------------------------------------------------- model and data


def build_model(args: argparse.Namespace) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq_len,
        hidden_dropout_prob=0.0,  # no dropout: every run is deterministic, so the runs can be compared
        attention_probs_dropout_prob=0.0,
        initializer_range=0.1,  # embedding rows of norm ~1, as in a pretrained model, for epsilon=1
        num_labels=2,
    )
    torch.manual_seed(args.seed)
    return BertForSequenceClassification(config).to(args.device)


def make_batches(args: argparse.Namespace, count: int, seed: int) -> list[Batch]:
    """Random token sequences in which half the tokens give the label away.

    Tokens 2-5 are "signal" tokens of label 0 and tokens 6-9 of label 1; every other token is drawn
    at random from the rest of the vocabulary. Half the positions of a sequence hold its label's tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    shape, signals = (args.batch, args.seq_len), args.seq_len // 2
    batches = []
    for _ in range(count):
        input_ids = torch.randint(10, args.vocab, shape, generator=generator)
        labels = torch.randint(0, 2, (args.batch,), generator=generator)
        signal = 2 + 4 * labels[:, None] + torch.randint(0, 4, (args.batch, signals), generator=generator)
        positions = torch.rand(shape, generator=generator).argsort(dim=1)[:, :signals]
        input_ids.scatter_(1, positions, signal)
        batches.append({"input_ids": input_ids.to(args.device), "labels": labels.to(args.device)})
    return batches


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[Batch]) -> float:
    model.eval()
    correct = sum((model(**b).logits.argmax(-1) == b["labels"]).sum().item() for b in batches)
    model.train()
    return correct / sum(len(b["labels"]) for b in batches)


# ---------------------------------------------------------------- training and measuring


class Run:
    """One of the three trainings: a copy of the initial model, its AdamW, and no adversary, SnippetFGM or FGM
    (called the same way: the usual FGM loop)."""

    def __init__(self, name: str, initial: torch.nn.Module, adversary_cls: type | None, args: argparse.Namespace):
        self.name, self.adversary_cls, self.args = name, adversary_cls, args
        self.model = copy.deepcopy(initial)
        self.adversary = adversary_cls(self.model) if adversary_cls else None  # before the first forward pass
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.step_seconds: list[float] = []
        self.loss = float("nan")

    def step(self, batch: Batch) -> None:
        """One training step, timed."""
        synchronize(self.args.device)
        start = time.perf_counter()
        # The usual FGM loop: clean pass, perturb the embedding, adversarial pass, restore, step.
        loss = self.model(**batch).loss
        loss.backward()
        if self.adversary is not None:
            self.adversary.attack(self.args.epsilon, EMB_NAME)
            self.model(**batch).loss.backward()
            self.adversary.restore(EMB_NAME)
        self.optimizer.step()
        self.optimizer.zero_grad()
        synchronize(self.args.device)
        self.step_seconds.append(time.perf_counter() - start)
        self.loss = loss.item()


def train_in_turns(initial: torch.nn.Module, data: dict, args: argparse.Namespace) -> dict[str, dict]:
    """The three runs on the same batches, one step of each at a time, in alternating order."""
    runs = [Run("plain", initial, None, args), Run("snippet FGM", initial, SnippetFGM, args),
            Run("fastadv FGM", initial, FGM, args)]  # fmt: skip
    print(f"\ntraining {args.steps} steps of each run, in turns", flush=True)
    for step, batch in enumerate(data["train"], 1):
        for run in runs if step % 2 else runs[::-1]:
            run.step(batch)
        if step % 10 == 0 or step == args.steps:
            medians = "  ".join(f"{r.name} {1000 * statistics.median(r.step_seconds):.1f} ms" for r in runs)
            print(f"  step {step:3d}/{args.steps}  median step: {medians}", flush=True)
    results = {}
    for run in runs:
        result = {
            "model": run.model,
            "step_s": statistics.median(run.step_seconds),
            "acc": accuracy(run.model, data["eval"]),
        }
        print(f"\n[{run.name}] final loss {run.loss:.4f}, eval accuracy {result['acc']:.3f}", flush=True)
        if run.adversary_cls is not None:
            result.update(measure_attack(initial, run.adversary_cls, data["train"][0], args))
        results[run.name] = result
    return results


def measure_attack(initial: torch.nn.Module, adversary_cls: type, batch: Batch, args: argparse.Namespace) -> dict:
    """Time of attack+restore and extra memory of one attack, on a fresh copy after a clean backward."""
    model = copy.deepcopy(initial)
    adversary = adversary_cls(model)
    model(**batch).loss.backward()

    def attack_restore() -> None:
        adversary.attack(args.epsilon, EMB_NAME)
        adversary.restore(EMB_NAME)

    seconds = median_seconds(attack_restore, args.device, repeats=10, warmup=2)
    memory = extra_memory_bytes(lambda: adversary.attack(args.epsilon, EMB_NAME), args.device)
    adversary.restore(EMB_NAME)
    print(f"  attack+restore {1000 * seconds:.2f} ms; one attack allocates {memory / 2**20:.2f} MB", flush=True)
    return {"attack_s": seconds, "memory": memory}


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| / ||a|| over all the parameters of two models (L2, in fp64)."""
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    diff = sum((pa.double() - pb.double()).square().sum() for pa, pb in pairs)
    norm = sum(pa.double().square().sum() for pa, _ in pairs)
    return (diff / norm).sqrt().item()


# ---------------------------------------------------------------- report


def report(runs: dict[str, dict], rel_diff: float, args: argparse.Namespace) -> None:
    torch_version = environment()["torch"]
    print(f"\ndevice: {device_description(args.device)} · torch {torch_version} · vocab {args.vocab} x {args.hidden}")
    print(f"{'':14}{'step ms':>9}{'attack+restore ms':>20}{'attack extra memory':>22}{'eval acc':>10}")
    for name, run in runs.items():
        attack = f"{1000 * run['attack_s']:.2f}" if "attack_s" in run else "-"
        memory = f"{run['memory'] / 2**20:.2f} MB" if "memory" in run else "-"
        print(f"{name:14}{1000 * run['step_s']:9.1f}{attack:>20}{memory:>22}{run['acc']:10.3f}")
    slow, fast = runs["snippet FGM"], runs["fastadv FGM"]
    speedup = slow["attack_s"] / fast["attack_s"]
    less_memory = f"{slow['memory'] / fast['memory']:.1f}x less memory" if fast["memory"] > 0 else "no extra memory"
    print(
        f"fastadv vs snippet: attack+restore {speedup:.1f}x faster, {less_memory}; "
        f"final weights rel diff {rel_diff:.1e}",
        flush=True,
    )


def main() -> int:
    args = parse_args()
    print(f"fastadv demo: BERT classifier, vocab {args.vocab} x hidden {args.hidden}, on {args.device}", flush=True)
    print(
        f"task: {args.batch} sequences of {args.seq_len} random ids per batch, labelled 0 or 1; half the positions "
        "hold the label's signal tokens (ids 2-5: 0, 6-9: 1)",
        flush=True,
    )
    initial = build_model(args)
    data = {"train": make_batches(args, args.steps, seed=args.seed + 1), "eval": make_batches(args, 16, args.seed + 2)}
    runs = train_in_turns(initial, data, args)
    rel_diff = relative_difference(runs["snippet FGM"]["model"], runs["fastadv FGM"]["model"])
    report(runs, rel_diff, args)
    if rel_diff > MAX_REL_DIFF:
        print(f"ERROR: fastadv's final weights differ from the snippet's by {rel_diff:.1e} > {MAX_REL_DIFF:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

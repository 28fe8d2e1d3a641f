"""What the bench scripts share: logging, provenance, the models (BERT, Llama) and arguments, timing in
turns, gradient comparisons, and appending CSV rows."""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from measure import device_description, environment, median_seconds

# `python -m pytest bench/test_bench_*.py` puts the working directory, the repository's root, first on
# sys.path, where `import fastadv` would take the checkout's folder whatever is installed: the benchmarks
# measure fastadv as installed. (tests/conftest.py does the same for the suite; bench/ has no conftest of
# its own, as a second `conftest` module would clash with the tests'.)
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

RESULTS = Path(__file__).resolve().parent / "results"
# The columns every result row starts with (provenance()).
PROVENANCE = ["date", "device", "device_type", "torch", "triton", "python", "cuda", "commit"]
# Every results CSV has these columns, one measured quantity per row (long form): what was run
# (benchmark, the configuration as "key=value; key=value", the implementation), the quantity (metric)
# and its value.
RESULT_COLUMNS = [*PROVENANCE, "benchmark", "config", "impl", "metric", "value", "notes"]
CONFIG_SEPARATOR = "; "


@dataclass(frozen=True)
class Layout:
    """How one benchmark's rows (a dict per implementation and configuration, as its script builds them)
    become long-form results: which of their keys describe the configuration and which are measured.

    A row holds PROVENANCE, ``benchmark`` (unless the layout names one), ``impl`` (under another key
    where the script calls it so, e.g. accuracy's ``method``), the config and metric keys, and ``notes``.
    """

    config: tuple[str, ...]
    metrics: tuple[str, ...]
    impl: str = "impl"
    benchmark: str | None = None  # every row's benchmark, when the rows do not carry one

    def long_rows(self, row: dict) -> list[dict]:
        """One long-form row (RESULT_COLUMNS) per metric of a wide ``row``. A config key or metric the row
        lacks is left out (a skipped configuration has no time); a key the layout does not place is an error."""
        required = {*PROVENANCE, self.impl, "notes"} | ({"benchmark"} if self.benchmark is None else set())
        unplaced = set(row) - required - {*self.config, *self.metrics}
        if unplaced or not required <= set(row):
            raise ValueError(
                f"a result row has keys {sorted(unplaced)} that its layout does not place and lacks "
                f"{sorted(required - set(row))}: add them to the Layout's config or metrics"
            )
        clashes = [f"{k}={row[k]!r}" for k in self.config if CONFIG_SEPARATOR in str(row.get(k, ""))]
        if clashes:
            raise ValueError(f"config values {clashes} hold {CONFIG_SEPARATOR!r}, which separates them in the CSV")
        head = {key: row[key] for key in PROVENANCE} | {
            "benchmark": self.benchmark or row["benchmark"],
            "config": CONFIG_SEPARATOR.join(f"{k}={row[k]}" for k in self.config if k in row),
            "impl": row[self.impl],
        }
        return [head | {"metric": m, "value": row[m], "notes": row["notes"]} for m in self.metrics if m in row]

    def wide_rows(self, long_rows: list[dict]) -> list[dict]:
        """The rows long_rows() was given, back from a CSV's long-form rows (values as the CSV's strings)."""
        wide: dict[tuple, dict] = {}
        for r in long_rows:
            key = tuple(r[c] for c in RESULT_COLUMNS if c not in ("metric", "value"))
            if key not in wide:
                wide[key] = {c: r[c] for c in PROVENANCE} | ({} if self.benchmark else {"benchmark": r["benchmark"]})
                wide[key] |= dict(item.split("=", 1) for item in r["config"].split(CONFIG_SEPARATOR) if item)
                wide[key] |= {self.impl: r["impl"], "notes": r["notes"]}
            wide[key][r["metric"]] = r["value"]
        return list(wide.values())


# The rows result_rows() makes: one per implementation of a configuration of vocab, dim and batch.
SHAPE_LAYOUT = Layout(config=("vocab", "dim", "batch"), metrics=("median_s", "repeats", "extra_memory_bytes"))


def provenance(device: torch.device) -> dict[str, str]:
    """The columns every result row starts with (PROVENANCE): date, device (in words and its type),
    versions (torch, triton, python, the CUDA torch was built with) and fastadv's commit."""
    env = environment()
    base = {"date": env["date"], "device": device_description(device), "device_type": device.type}
    return base | {k: env[k] for k in ("torch", "triton", "python", "cuda")} | {"commit": git_commit()}


def bert_classifier(
    vocab: int, hidden: int, layers: int, seq: int, device: torch.device, attention: str | None = None
) -> torch.nn.Module:
    """A random BertForSequenceClassification (2 labels, no dropout, seed 0); ``attention`` e.g. "eager"."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden, max_position_embeddings=seq, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    if attention is not None:
        config._attn_implementation = attention
    torch.manual_seed(0)
    return BertForSequenceClassification(config).to(device)


def llama_lm(
    vocab: int,
    hidden: int,
    layers: int,
    intermediate: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    attention: str = "sdpa",
) -> torch.nn.Module:
    """A random LlamaForCausalLM (seed 0, untied head) built directly on ``device`` in ``dtype``.

    Heads of 128 (at least one) and a quarter as many key/value heads (grouped-query attention, as
    in Llama 3); ``attention`` e.g. "eager" (which has a double backward). Nothing is downloaded.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    return _causal_lm(
        LlamaConfig, LlamaForCausalLM, 128, vocab, hidden, layers, intermediate, seq, device, dtype, attention
    )


def qwen2_lm(
    vocab: int, hidden: int, layers: int, intermediate: int, seq: int, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:  # fmt: skip
    """A random Qwen2ForCausalLM (seed 0, untied head, heads of 64, a quarter as many key/value heads,
    sdpa attention), built on ``device`` in ``dtype``. Nothing is downloaded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _causal_lm(
        Qwen2Config, Qwen2ForCausalLM, 64, vocab, hidden, layers, intermediate, seq, device, dtype, "sdpa"
    )


def _causal_lm(
    config_class: type, model_class: type, head_dim: int, vocab: int, hidden: int, layers: int, intermediate: int,
    seq: int, device: torch.device, dtype: torch.dtype, attention: str,
) -> torch.nn.Module:  # fmt: skip
    """A random causal LM (seed 0, untied head) with heads of ``head_dim`` (at least one) and a quarter as
    many key/value heads, its parameters made in ``dtype`` on the device (no full-precision copy first)."""
    heads = max(1, hidden // head_dim)
    config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = attention
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def bert_step_parser(description: str, vocab: int, layers: int | None, layers_help: str) -> argparse.ArgumentParser:
    """The arguments of the BERT training-step benchmarks (pgd.py, gradient_penalty.py): device, sizes, --quick."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--hidden", type=int, default=None, help="default 256 on CPU, 768 on CUDA")
    parser.add_argument("--layers", type=int, default=layers, help=layers_help)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing saved")
    return parser


def parameter_gradients(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter gradient of ``model``, flattened into one fp64 vector."""
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def relative_grad_difference(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """||g - g_ref|| / ||g_ref|| over every parameter gradient of two copies of one model, in fp64."""
    g, g_ref = parameter_gradients(model), parameter_gradients(reference)
    return ((g - g_ref).norm() / g_ref.norm()).item()


def result_rows(
    device: torch.device, benchmark: str, shape: dict, times: dict[str, float], repeats: int,
    memory: dict[str, int], notes: dict[str, str] | str,
) -> list[dict]:  # fmt: skip
    """One CSV row per implementation: provenance, ``shape`` (vocab, dim, batch), time, memory, notes."""
    return [
        provenance(device)
        | {"benchmark": benchmark, **shape, "impl": name, "median_s": f"{seconds:.6g}", "repeats": repeats}
        | {"extra_memory_bytes": memory[name], "notes": notes if isinstance(notes, str) else notes[name]}
        for name, seconds in times.items()
    ]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@functools.cache
def git_commit() -> str:
    """The commit of fastadv's checkout, short (+dirty when fastadv/ or kernels/ differ from it).

    A copy of the tree without its .git (a lent GPU machine gets one) names it in FASTADV_COMMIT;
    '?' when neither says.
    """
    import fastadv

    if os.environ.get("FASTADV_COMMIT"):
        return os.environ["FASTADV_COMMIT"]

    root = Path(fastadv.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "?"
        dirty = "+dirty" if commit != "?" and git("status", "--porcelain", "--", "fastadv", "kernels") else ""
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    return commit + dirty


def fastadv_revision() -> str:
    """fastadv's version and the commit of its checkout, e.g. 'fastadv 0.1.0 @ 63fa9d9+dirty'."""
    import fastadv

    return f"fastadv {fastadv.__version__} @ {git_commit()}"


def load_average() -> float:
    """The 1-minute load average (2 cores busy = 2.0): how shared the machine was while timing."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def load_note(before: float) -> str:
    return f"loadavg(1min) before/after timing={before:.2f}/{load_average():.2f}; timed in turns"


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turns (a b c, c b a, a b c, ...), each by median_seconds.

    Taking turns, rather than all repeats of one and then of the next, makes a change of load on a
    shared machine fall on every implementation alike instead of on whichever ran at that moment.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(repeats):
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(median_seconds(fns[name], device, repeats=1, warmup=1 if i == 0 else 0))
    return {name: statistics.median(t) for name, t in times.items()}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def append_rows(rows: list[dict], csv_path: Path, layout: Layout) -> None:
    """Append ``rows`` to a results CSV in long form (RESULT_COLUMNS; never overwriting), refusing a file
    with other columns."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    if not new:
        with csv_path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != RESULT_COLUMNS:
            raise SystemExit(f"{csv_path} has columns {header}, expected {RESULT_COLUMNS}: not appending to it.")
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(long_row for row in rows for long_row in layout.long_rows(row))


def read_rows(csv_path: Path, layout: Layout) -> list[dict]:
    """The rows append_rows() wrote to ``csv_path``, one dict per implementation and configuration."""
    with csv_path.open(newline="") as f:
        return layout.wide_rows(list(csv.DictReader(f)))

"""LLaMA-Factory's ``llamafactory-cli train`` made adversarial by ``fastadv-run``, against the same run through a
hand-written adversarial subclass of its trainer (issue 31).

Run it with the Python of an environment that has LLaMA-Factory and fastadv (not CI's: LLaMA-Factory pins its
own transformers):

    python3 -m venv /tmp/lfvenv && /tmp/lfvenv/bin/pip install torch==2.13.0 llamafactory==0.9.5
    /tmp/lfvenv/bin/pip uninstall -y torchvision      # its wheel breaks beside the CPU torch; then move
    # torchaudio/lib/_torchaudio.so aside, and: /tmp/lfvenv/bin/pip install --no-deps -e .
    /tmp/lfvenv/bin/python bench/llama_factory.py

For full fine-tuning and LoRA, FGM and PGD, a tiny Qwen2 (built from a config, vocabulary 300, a byte-level BPE
trained here) on 16 alpaca-format examples, ``--steps`` optimizer steps of batch 2, under LLaMA-Factory's
default activation checkpointing (reentrant) unless said: three runs each,

    plain        llamafactory-cli train sft.yaml
    launcher     fastadv-run --method M --set ... -- llamafactory-cli train sft.yaml
    handwritten  the same training with llamafactory.train.sft.workflow.CustomSeq2SeqTrainer replaced by
                 adversarial_trainer(CustomSeq2SeqTrainer) with the adversary built in its __init__

and the per-step losses and gradient norms of the launcher's run must equal the hand-written one's exactly
(trainer_state.json's log history, full precision): the script exits non-zero otherwise. PGD runs twice: under
the default reentrant checkpointing (its inner passes then take dL/de by a backward whose parameter gradients
are dropped) and with ``use_reentrant_gc: false``.
Also reported: each run's ``train_runtime`` (the Trainer's, startup excluded) and its ratio to plain's, on
this machine (tiny model: the ratio is the passes' count more than anything). Rows go to
bench/results/llamafactory.csv (``--no-save``: none).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Layout, append_rows, fastadv_revision, load_average, log, provenance

RESULTS = Path(__file__).resolve().parent / "results" / "llamafactory.csv"
LAYOUT = Layout(
    config=("finetuning", "method", "checkpointing", "steps"),
    metrics=("train_runtime_s", "ratio_to_plain", "losses_equal_handwritten", "refused_reentrant"),
    # refused_reentrant: rows of commit ce779e9 only, when PGD was refused under reentrant checkpointing
    benchmark="llamafactory_sft",
)
METHODS = {"fgm": ["epsilon=1.0"], "pgd": ["epsilon=1.0", "alpha=0.3", "steps=2"]}
HANDWRITTEN = """
import sys
import llamafactory.train.sft.workflow as workflow
from fastadv import build_adversary
from fastadv.integrations.hf import adversarial_trainer

METHOD, OPTIONS = sys.argv.pop(1), dict(item.split("=") for item in sys.argv.pop(1).split(",") if item)


class HandWritten(adversarial_trainer(workflow.CustomSeq2SeqTrainer)):
    def __init__(self, *args, model=None, **kwargs):
        super().__init__(*args, model=model, adversary=build_adversary(model, METHOD, **OPTIONS), **kwargs)


workflow.CustomSeq2SeqTrainer = HandWritten
from llamafactory.train.tuner import run_exp

run_exp()
"""


def make_inputs(folder: Path) -> None:
    """A tiny Qwen2 and its tokenizer in ``folder/model``; 16 alpaca examples in ``folder/data``."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    corpus = ["what is two plus two", "four", "name a color", "blue", "hello there", "how are you", "fine thanks"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 20 + ["Human: Assistant:"], vocab_size=300, special_tokens=["<pad>", "<eos>"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "data").mkdir()
    pairs = [("what is two plus two", "four"), ("name a color", "blue"), ("hello there", "how are you")] * 6
    rows = [{"instruction": q, "input": "", "output": a} for q, a in pairs[:16]]
    (folder / "data" / "tiny.json").write_text(json.dumps(rows))
    (folder / "data" / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    (folder / "handwritten.py").write_text(HANDWRITTEN)


def config(folder: Path, output: str, finetuning: str, steps: int, reentrant: bool) -> Path:
    lines = {
        "model_name_or_path": str(folder / "model"), "stage": "sft", "do_train": "true",
        "finetuning_type": finetuning, "dataset": "tiny", "dataset_dir": str(folder / "data"), "template": "default",
        "cutoff_len": "32", "overwrite_cache": "true", "preprocessing_num_workers": "1",
        "output_dir": str(folder / output), "logging_steps": "1", "save_strategy": '"no"',
        "overwrite_output_dir": "true", "report_to": "none", "per_device_train_batch_size": "2",
        "learning_rate": "1.0e-3", "max_steps": str(steps), "lr_scheduler_type": "constant", "bf16": "false",
        "seed": "0", "disable_tqdm": "true",
    }  # fmt: skip
    if finetuning == "lora":
        lines |= {"lora_rank": "4", "lora_target": "q_proj,v_proj"}
    if not reentrant:
        lines["use_reentrant_gc"] = "false"
    path = folder / f"{output}.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in lines.items()))
    return path


def run(command: list[str], folder: Path, output: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The command's result and its trainer_state.json log history (empty if it failed)."""
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=900)
    state = folder / output / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"] if done.returncode == 0 and state.exists() else []
    return done, history


def per_step(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if key in entry and "train_runtime" not in entry]


def runtime(history: list[dict]) -> float:
    return next(entry["train_runtime"] for entry in history if "train_runtime" in entry)


def compare(
    folder: Path, finetuning: str, method: str, steps: int, reentrant: bool, plain_runtime: float
) -> tuple[list[dict], list[str]]:
    """The launcher's and the hand-written run of ``method``: their wide rows (without provenance) and failures."""
    bin_dir = Path(sys.executable).parent
    cli, launcher = str(bin_dir / "llamafactory-cli"), str(bin_dir / "fastadv-run")
    options, failures = METHODS[method], []
    commands = {
        "launcher": [launcher, "--method", method, *[x for o in options for x in ("--set", o)], "--", cli, "train"],
        "handwritten": [sys.executable, "handwritten.py", method, ",".join(options)],
    }
    histories = {}
    for impl, command in commands.items():
        done, histories[impl] = run([*command, str(config(folder, impl, finetuning, steps, reentrant))], folder, impl)
        if done.returncode != 0:
            failures.append(f"{finetuning} {method} {impl} failed:\n{done.stderr[-2000:]}")
    curves = {impl: (per_step(h, "loss"), per_step(h, "grad_norm")) for impl, h in histories.items()}
    equal = bool(curves["launcher"][0]) and curves["launcher"] == curves["handwritten"]
    if not equal:
        failures.append(f"{finetuning} {method}: launcher {curves['launcher']} != hand-written {curves['handwritten']}")
    rows = []
    for impl, history in histories.items():
        if not history:
            continue
        seconds = runtime(history)
        rows.append({
            "finetuning": finetuning, "method": method, "steps": steps, "impl": impl,
            "checkpointing": "reentrant" if reentrant else "non-reentrant (use_reentrant_gc: false)",
            "train_runtime_s": f"{seconds:.3f}", "ratio_to_plain": f"{seconds / plain_runtime:.2f}",
            "losses_equal_handwritten": equal,
        })  # fmt: skip
    log(f"{finetuning} {method} {'reentrant' if reentrant else 'non-reentrant'}: launcher == hand-written: {equal}")
    return rows, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--no-save", action="store_true", help="print only; append no rows")
    args = parser.parse_args()
    cli = str(Path(sys.executable).parent / "llamafactory-cli")
    from importlib.metadata import version

    note = (
        f"{fastadv_revision()}; llamafactory {version('llamafactory')}; transformers "
        f"{version('transformers')}; tiny Qwen2 (V=300, d=32, 2 layers), batch 2"
    )
    base = provenance(torch.device("cpu"))
    rows, failures, load_before = [], [], load_average()
    with tempfile.TemporaryDirectory(prefix="fastadv-llamafactory-") as name:
        folder = Path(name)
        make_inputs(folder)
        for finetuning in ("full", "lora"):
            yaml = config(folder, "plain", finetuning, args.steps, reentrant=True)
            plain, history = run([cli, "train", str(yaml)], folder, "plain")
            if plain.returncode != 0:
                raise SystemExit(f"plain LLaMA-Factory ({finetuning}) failed:\n{plain.stderr[-3000:]}")
            plain_runtime = runtime(history)
            rows.append({"finetuning": finetuning, "method": "none", "checkpointing": "reentrant", "steps": args.steps,
                         "impl": "plain", "train_runtime_s": f"{plain_runtime:.3f}"})  # fmt: skip
            for method, reentrant in (("fgm", True), ("pgd", True), ("pgd", False)):
                more, failed = compare(folder, finetuning, method, args.steps, reentrant, plain_runtime)
                rows, failures = rows + more, failures + failed
    # One run after another, not in turns: the load says how far the times can be trusted.
    note += f"; loadavg(1min) before/after={load_before:.2f}/{load_average():.2f}; runs one after another"
    rows = [base | row | {"notes": note} for row in rows]
    for row in rows:
        print({k: v for k, v in row.items() if k in LAYOUT.config + LAYOUT.metrics + ("impl",)})
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    if not args.no_save:
        append_rows(rows, RESULTS, LAYOUT)
        log(f"rows appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

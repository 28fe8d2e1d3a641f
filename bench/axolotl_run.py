"""axolotl's ``axolotl train`` made adversarial by fastadv's plugin (one YAML key), against the same run through
``trainer_cls:`` (a hand-written adversarial subclass of axolotl's trainer), and a run without the key against
axolotl without fastadv (issue 31).

Run it with the Python of an environment that has axolotl (Python >= 3.12) and fastadv (not CI's):

    python3.12 -m venv /tmp/axvenv && /tmp/axvenv/bin/pip install torch==2.13.0 axolotl==0.21.0
    /tmp/axvenv/bin/pip install --no-deps -e .
    /tmp/axvenv/bin/python bench/axolotl_run.py

axolotl 0.21.0 installs there (pip takes torch 2.13.0's CUDA build, +cu130) and trains on a machine without a
GPU, on the CPU (``--launcher python``: in one process, no accelerate launch). A tiny Qwen2 and 16 alpaca
examples (bench/llama_factory.py's make_inputs), ``--steps`` optimizer steps of batch 2, no activation
checkpointing, for FGM and PGD, four runs:

    plain        axolotl without fastadv: fastadv's ``axolotl.plugins`` entry point filtered out, as if fastadv
                 were not installed
    no_key       axolotl with fastadv's plugin loaded from its entry point, no adversarial key in the YAML
    key          the same YAML plus ``adversarial_method: fgm`` (PGD: and ``adversarial_options``)
    trainer_cls  ``trainer_cls: fastadv_handwritten.HandWritten`` (``adversarial_trainer(AxolotlTrainer)``, the
                 adversary built in its ``__init__``), fastadv's entry point filtered out as for plain

Checks, on the final weights axolotl saves (model.safetensors, compared tensor by tensor, bit for bit): no_key
equals plain, key equals trainer_cls, and key differs from plain (the adversary did something). The script
exits non-zero otherwise. Also reported: the per-step losses as axolotl logs them (rounded to 4 digits) and
each run's ``train_runtime``. Rows go to bench/results/axolotl.csv (``--no-save``: none).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Layout, append_rows, fastadv_revision, load_average, log, provenance
from llama_factory import make_inputs

RESULTS = Path(__file__).resolve().parent / "results" / "axolotl.csv"
LAYOUT = Layout(
    config=("method", "run", "steps"),
    metrics=("train_runtime_s", "bitwise_equal_to_reference", "losses"),
    impl="run",
    benchmark="axolotl_train",
)
# What each adversarial run adds to the YAML, and what the hand-written trainer builds.
METHODS = {
    "fgm": {"adversarial_method": "fgm", "adversarial_epsilon": 1.0},
    "pgd": {"adversarial_method": "pgd", "adversarial_epsilon": 1.0, "adversarial_options": {"alpha": 0.3, "steps": 2}},
}
# The reference each run's final weights must equal (or, for "key", also differ from plain's).
REFERENCES = {"no_key": "plain", "key": "trainer_cls"}

# Runs axolotl's CLI in this process with fastadv's axolotl.plugins entry point filtered out.
WITHOUT_FASTADV = """
import sys
import axolotl.integrations.base as base
from importlib.metadata import entry_points as all_entry_points

def entry_points(**kwargs):
    return [p for p in all_entry_points(**kwargs) if not p.value.startswith("fastadv.")]

base.entry_points = entry_points

if __name__ == "__main__":  # axolotl spawns workers, which import this file again
    from axolotl.cli.main import main

    sys.argv = ["axolotl", *sys.argv[1:]]
    main()
"""
HANDWRITTEN = """
import json
import os

from axolotl.core.trainers.base import AxolotlTrainer
from fastadv import build_adversary
from fastadv.integrations.hf import adversarial_trainer

SPEC = json.loads(os.environ["FASTADV_HANDWRITTEN"])


class HandWritten(adversarial_trainer(AxolotlTrainer)):
    def __init__(self, *args, model=None, **kwargs):
        options = {"epsilon": SPEC["adversarial_epsilon"], **SPEC.get("adversarial_options", {})}
        adversary = build_adversary(model, SPEC["adversarial_method"], **options)
        super().__init__(*args, model=model, adversary=adversary, **kwargs)
"""


def yaml_for(folder: Path, run: str, method: str, steps: int) -> Path:
    """The run's YAML (JSON is YAML): the same training for every run, plus the key or trainer_cls."""
    config = {
        "base_model": str(folder / "model"),
        "datasets": [{"path": str(folder / "data" / "tiny.json"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(folder / "prepared"), "val_set_size": 0, "output_dir": str(folder / run),
        "sequence_len": 128, "sample_packing": False, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "max_steps": steps, "num_epochs": 1, "learning_rate": 1e-3, "optimizer": "adamw_torch",
        "lr_scheduler": "constant", "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False,
        "logging_steps": 1, "save_strategy": "no", "seed": 0,
    }  # fmt: skip
    if run == "key":
        config |= METHODS[method]
    if run == "trainer_cls":
        config["trainer_cls"] = "fastadv_handwritten.HandWritten"
    path = folder / f"{method}_{run}.yml"
    path.write_text(json.dumps(config, indent=1))
    return path


def train(folder: Path, run: str, method: str, steps: int) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """One ``axolotl train``: the final weights, the logged per-step losses, train_runtime."""
    yaml = yaml_for(folder, run, method, steps)
    bin_dir = Path(sys.executable).parent
    if run in ("plain", "trainer_cls"):
        command = [sys.executable, str(folder / "without_fastadv.py"), "train", str(yaml), "--launcher", "python"]
    else:
        command = [str(bin_dir / "axolotl"), "train", str(yaml), "--launcher", "python"]
    env = os.environ | {
        "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(folder),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FASTADV_HANDWRITTEN": json.dumps(METHODS[method]),
    }  # fmt: skip
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{method} {run}: axolotl train failed:\n{(done.stdout + done.stderr)[-4000:]}")
    logged = [ast.literal_eval(line[line.index("{'") :]) for line in _lines(done.stdout + done.stderr)]
    losses = [float(entry["loss"]) for entry in logged if "loss" in entry]
    runtime = next(float(entry["train_runtime"]) for entry in logged if "train_runtime" in entry)
    from safetensors.torch import load_file

    return load_file(folder / run / "model.safetensors"), losses, runtime


def _lines(output: str) -> list[str]:
    """The Trainer's logged dicts, one per line (tqdm's carriage returns split off)."""
    pieces = [piece for line in output.splitlines() for piece in line.split("\r")]
    return [p for p in pieces if "{'loss'" in p or "{'train_runtime'" in p]


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--no-save", action="store_true", help="print only; append no rows")
    args = parser.parse_args()
    from importlib.metadata import version

    note = (
        f"{fastadv_revision()}; axolotl {version('axolotl')}; transformers {version('transformers')}; tiny Qwen2 "
        f"(V=300, d=32, 2 layers), batch 2, --launcher python, no activation checkpointing"
    )
    rows, failures, load_before = [], [], load_average()
    with tempfile.TemporaryDirectory(prefix="fastadv-axolotl-") as name:
        folder = Path(name)
        make_inputs(folder)
        (folder / "without_fastadv.py").write_text(WITHOUT_FASTADV)
        (folder / "fastadv_handwritten.py").write_text(HANDWRITTEN)
        for method in args.methods:
            results = {run: train(folder, run, method, args.steps) for run in ("plain", "no_key", "key", "trainer_cls")}
            weights = {run: result[0] for run, result in results.items()}
            for run, (_, losses, runtime) in results.items():
                reference = REFERENCES.get(run)
                equal = bitwise_equal(weights[run], weights[reference]) if reference else ""
                if reference and not equal:
                    failures.append(f"{method}: the {run} run's final weights differ from the {reference} run's")
                rows.append({
                    "method": method, "run": run, "steps": args.steps, "train_runtime_s": f"{runtime:.3f}",
                    "bitwise_equal_to_reference": equal, "losses": " ".join(f"{x:g}" for x in losses),
                })  # fmt: skip
                same = f"; final weights == {reference}'s: {equal}" if reference else ""
                log(f"{method} {run:11s}: losses {losses}; {runtime:.2f} s{same}")
            if bitwise_equal(weights["key"], weights["plain"]):
                failures.append(f"{method}: the key run's weights equal plain's: the adversary did nothing")
    note += f"; loadavg(1min) before/after={load_before:.2f}/{load_average():.2f}; runs one after another"
    base = provenance(torch.device("cpu"))
    rows = [base | row | {"notes": note} for row in rows]
    if not args.no_save:
        append_rows(rows, RESULTS, LAYOUT)
        log(f"appended {len(rows)} rows to {RESULTS}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

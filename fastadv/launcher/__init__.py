"""``fastadv-run``: any command that trains with a Hugging Face Trainer, made adversarial from outside.

    fastadv-run --method pgd --set epsilon=1.0 --set steps=3 -- llamafactory-cli train sft.yaml
    fastadv-run --method fgm -- trl sft --model_name_or_path ... --dataset_name ...
    FASTADV_METHOD=fgm FASTADV_OPTIONS=epsilon=1.0 fastadv-run -- torchrun --nproc-per-node 2 train.py

For frameworks that build their Trainer themselves and have no plugin point (LLaMA-Factory, TRL's CLI, a
script of yours). The launcher puts a ``sitecustomize`` first on ``PYTHONPATH`` (as ddtrace-run and
opentelemetry-instrument do), so every Python process of the command, torchrun's and accelerate's workers
included, makes each Trainer adversarial when its ``train()`` starts (``fastadv.integrations.hf.make_adversarial``
with ``fastadv.build_adversary``), and says so on stderr. The method and its options come from the flags or,
without them, from ``FASTADV_METHOD``, ``FASTADV_OPTIONS`` (``key=value,key=value``) and ``FASTADV_START_STEP``.

It fails loudly: a command that ends without error and made no Trainer adversarial (it trained with its own
loop, or a Trainer whose ``train`` never ran Trainer's) exits with status 3 and says why: a launcher that
trains plainly without a word would be the worst outcome. The command's own failure is its exit status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SITE = Path(__file__).resolve().parent / "_site"
NOTHING_MADE_ADVERSARIAL = 3  # the exit status when the command trained without any adversarial Trainer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadv-run",
        description="Run a command whose Hugging Face Trainers train with a fastadv adversary.",
        epilog="Example: fastadv-run --method pgd --set epsilon=1.0 -- llamafactory-cli train sft.yaml",
    )
    methods = "fgm, fgsm, pgd, freelb, gradient_penalty, vat, smart or r3f"
    parser.add_argument("--method", help=f"{methods} (default: $FASTADV_METHOD)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="an option of the method, e.g. epsilon=1.0; repeat it (default: $FASTADV_OPTIONS)",
    )  # fmt: skip
    parser.add_argument(
        "--start-step", type=int, help="optimizer steps trained plainly first (default: $FASTADV_START_STEP or 0)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    return parser


def environment_for(method: str, options: dict[str, str], start_step: int, marker: str) -> dict[str, str]:
    """The command's environment: this one, with the method's variables and the sitecustomize folder first on
    PYTHONPATH."""
    environment = dict(os.environ)
    environment["FASTADV_METHOD"] = method
    environment["FASTADV_OPTIONS"] = ",".join(f"{key}={value}" for key, value in options.items())
    environment["FASTADV_START_STEP"] = str(start_step)
    environment["FASTADV_RUN_MARKER"] = marker
    paths = [str(SITE), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        _parser().error("no command to run: fastadv-run [options] -- command ...")
    sys.path.insert(0, str(SITE))
    from fastadv_launch_hook import options_from_environment

    from fastadv.methods.by_name import method_options

    method = args.method or os.environ.get("FASTADV_METHOD", "")
    if not method:
        _parser().error("no method: pass --method (fgm, pgd, ...) or set FASTADV_METHOD")
    options = {} if args.set else options_from_environment()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _parser().error(f"--set takes KEY=VALUE, found {item!r}")
        options[key.strip()] = value.strip()
    try:
        accepted = method_options(method)  # the name and the option names, checked before anything runs
    except ValueError as error:
        _parser().error(str(error))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        _parser().error(f"{method} has no option {', '.join(unknown)}; its options: {', '.join(accepted)}")
    start = args.start_step if args.start_step is not None else int(os.environ.get("FASTADV_START_STEP", "0") or 0)
    with tempfile.TemporaryDirectory(prefix="fastadv-run-") as folder:
        marker = Path(folder) / "made-adversarial"
        marker.touch()
        returncode = subprocess.call(command, env=environment_for(method, options, start, str(marker)))
        made = marker.read_text(encoding="utf-8").strip()
    if returncode != 0:
        return returncode
    if not made:
        print(
            f"fastadv-run: ERROR: {' '.join(command)!r} ended without error, and no Hugging Face Trainer was made "
            f"adversarial: it trained without {method} (its own loop, or a Trainer whose train() never ran "
            "transformers.Trainer.train). Build the adversary in the script instead (fastadv.FGM, "
            "fastadv.integrations.hf.AdversarialTrainer).",
            file=sys.stderr,
        )
        return NOTHING_MADE_ADVERSARIAL
    return 0

"""fastadv-run: a command that trains with a Hugging Face Trainer, made adversarial from outside.

Each test runs the launcher as users do (``python -m fastadv.launcher ... -- python script.py``) on scripts
written here: one that trains a tiny BERT with a plain ``transformers.Trainer`` (as LLaMA-Factory and TRL's
CLI build theirs), one that trains with its own loop, one that fails. The Trainer's run must equal an
``AdversarialTrainer`` built by hand, bitwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastadv import FGM, PGD

# A tiny BERT, 6 examples, 3 optimizer steps of SGD: run under the launcher with a plain Trainer, and here with
# AdversarialTrainer. ``train(trainer_class, output, extra)`` (``extra(model)``: more keywords for the Trainer)
# returns the Trainer and its model's final weights, flat.
TRAINING = textwrap.dedent(
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    def examples():
        g = torch.Generator().manual_seed(3)
        ones = torch.ones(7, dtype=torch.long)
        return [{"input_ids": torch.randint(1, 50, (7,), generator=g), "attention_mask": ones,
                 "labels": torch.tensor(i % 2)} for i in range(6)]

    def model():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config)

    def train(trainer_class, output, extra=None):
        args = TrainingArguments(output_dir=output, report_to=[], use_cpu=True, per_device_train_batch_size=2,
                                 max_steps=3, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                                 max_grad_norm=0.0, train_sampling_strategy="sequential", save_strategy="no",
                                 disable_tqdm=True)
        m = model()
        trainer = trainer_class(model=m, args=args, train_dataset=examples(), **(extra(m) if extra else {}))
        trainer.train()
        return trainer, torch.cat([p.detach().flatten() for p in m.parameters()])
    """
)
TRAINER_SCRIPT = TRAINING + textwrap.dedent(
    """
    import sys
    trainer, weights = train(Trainer, sys.argv[2])
    torch.save(weights, sys.argv[1])
    print("trained with", type(trainer).__name__)
    """
)
OWN_LOOP_SCRIPT = TRAINING + textwrap.dedent(
    """
    m = model()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    for batch in examples():
        m(**{k: v[None] for k, v in batch.items()}).loss.backward()
        optimizer.step()
    """
)


def launch(
    tmp_path: Path, script: str, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    command = [sys.executable, "-m", "fastadv.launcher", *options, "--", sys.executable, str(path)]
    command += [str(tmp_path / "weights.pt"), str(tmp_path / "out")]
    environment = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)


def reference_weights(tmp_path: Path, make_adversary, start: int = 0) -> torch.Tensor:
    """The weights AdversarialTrainer ends with, built by hand on the same run."""
    from fastadv.integrations.hf import AdversarialTrainer

    namespace: dict = {}
    exec(TRAINING, namespace)

    def extra(model):
        return {"adversary": make_adversary(model), "adversary_start_step": start}

    return namespace["train"](AdversarialTrainer, str(tmp_path / "reference"), extra)[1]


@pytest.mark.parametrize(
    ("options", "env", "make", "start"),
    [
        (["--method", "fgm", "--set", "epsilon=0.5"], {}, lambda m: FGM(m, epsilon=0.5), 0),
        (
            [],
            {"FASTADV_METHOD": "pgd", "FASTADV_OPTIONS": "epsilon=1.0,alpha=0.3,steps=2", "FASTADV_START_STEP": "1"},
            lambda m: PGD(m, epsilon=1.0, alpha=0.3, steps=2),
            1,
        ),
    ],
    ids=["flags", "environment"],
)
def test_a_plain_trainer_under_the_launcher_trains_as_an_adversarial_trainer(tmp_path, options, env, make, start):
    done = launch(tmp_path, TRAINER_SCRIPT, *options, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained with AdversarialTrainer" in done.stdout
    assert "fastadv-run: Trainer made adversarial as AdversarialTrainer with" in done.stderr
    assert f"from optimizer step {start}" in done.stderr
    got, expected = torch.load(tmp_path / "weights.pt"), reference_weights(tmp_path, make, start)
    assert torch.equal(got, expected), "the launched Trainer trained otherwise than AdversarialTrainer"


def test_a_command_that_trains_without_a_trainer_fails_loudly(tmp_path):
    done = launch(tmp_path, OWN_LOOP_SCRIPT, "--method", "fgm")
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "no Hugging Face Trainer was made adversarial" in done.stderr


def test_the_commands_own_failure_is_its_exit_status(tmp_path):
    done = launch(tmp_path, "import sys; sys.exit(5)", "--method", "fgm")
    assert done.returncode == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "fmg"], "no fastadv method is named 'fmg'"),
        (["--method", "pgd", "--set", "eps=1"], "pgd has no option eps"),
        (["--method", "pgd", "--set", "eps"], "--set takes KEY=VALUE"),
        ([], "no method"),
    ],
)
def test_a_bad_method_or_option_is_refused_before_anything_runs(tmp_path, options, message):
    marker = tmp_path / "ran"
    env = {"FASTADV_METHOD": ""}
    done = launch(tmp_path, f"open({str(marker)!r}, 'w').close()", *options, env=env)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not marker.exists(), "the command ran"


def test_an_adversarial_trainer_under_the_launcher_is_refused(tmp_path):
    script = TRAINING + textwrap.dedent(
        """
        from fastadv import FGM
        from fastadv.integrations.hf import AdversarialTrainer
        train(AdversarialTrainer, "out", lambda m: {"adversary": FGM(m)})
        """
    )
    done = launch(tmp_path, script, "--method", "pgd")
    assert done.returncode != 0 and "adversarial already" in done.stderr


def test_a_sitecustomize_of_the_environment_still_runs(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = '1'\n")
    script = TRAINER_SCRIPT + 'print("theirs", __import__("os").environ.get("THEIRS_RAN"))\n'
    path = os.pathsep.join(filter(None, [str(theirs), os.environ.get("PYTHONPATH", "")]))
    done = launch(tmp_path, script, "--method", "fgm", env={"PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "theirs 1" in done.stdout and "trained with AdversarialTrainer" in done.stdout


# ------------------------------------------------------------ TRL's CLI: trl sft


def sft_inputs(folder: Path) -> None:
    """A tiny Llama with a word-level tokenizer in ``folder/model``, 12 texts in ``folder/data/train.jsonl``."""
    import json

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 64)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "data").mkdir()
    g = torch.Generator().manual_seed(4)
    lines = [" ".join(f"w{int(t)}" for t in torch.randint(2, 64, (5 + i % 5,), generator=g)) for i in range(12)]
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))


def logged(stdout: str, key: str) -> list[str]:
    import ast

    return [ast.literal_eval(line)[key] for line in stdout.splitlines() if line.startswith("{") and f"'{key}'" in line]


def test_trl_sft_through_the_launcher_trains_adversarially_with_the_same_token_counts(tmp_path):
    sft_inputs(tmp_path)
    trl = str(Path(sys.executable).parent / "trl")
    arguments = [
        "sft", "--model_name_or_path", "model", "--dataset_name", "data", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
        "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--max_length", "16",
    ]  # fmt: skip
    environment = {**os.environ, "FASTADV_METHOD": ""}
    runs = {}
    for name, prefix in (
        ("plain", []),
        ("fgm", [sys.executable, "-m", "fastadv.launcher", "--method", "fgm", "--set", "epsilon=1.0", "--"]),
    ):
        command = [*prefix, trl, *arguments, "--output_dir", f"out_{name}"]
        runs[name] = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    plain, fgm = runs["plain"], runs["fgm"]
    assert "fastadv-run: SFTTrainer made adversarial as AdversarialSFTTrainer with FGM(epsilon=1.0" in fgm.stderr
    tokens = logged(plain.stdout, "num_tokens")
    assert len(tokens) == 3 and logged(fgm.stdout, "num_tokens") == tokens, "TRL's token counts changed"
    assert logged(fgm.stdout, "grad_norm") != logged(plain.stdout, "grad_norm"), "the FGM run trained plainly"

"""Every code block of README.md, docs/*.md and bench/README.md runs here, and every relative link resolves.

The fenced blocks are parsed out of the Markdown. Each must name its language, one of:

    python  executed, each block in a fresh namespace holding what the docs say a block may assume:
            ``model`` (a small random BERT classifier), ``batch`` (a dict of its inputs and labels),
            ``optimizer``, ``loader`` (batches), ``accelerator``, ``args`` (TrainingArguments), ``dataset``
    diff    the ``+`` and context lines (the code after the swap) executed as Python, in that namespace
    bash    each command checked, not run (running them is CI's job): the set-up commands must be the
            ones ``.ci/run`` runs; each script must exist and compile, each flag a command passes must
            be in its ``--help``, and a bench script with ``--quick`` must be run that way by ``.ci/run``
    text    output and layouts, not run; the repository paths it names must exist

A block in any other language, without one, or indented instead of fenced fails here: no block can be
added without being run or checked.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
DOC_TOPICS = ("targets", "methods", "engines", "snippet-differences", "backends", "measurements")
README_MAX_BYTES = 12_000  # the "about 10 KB": the details live in docs/, the tables in bench/
CI_RUN = (ROOT / ".ci" / "run").read_text()
CI_LINES = {line.strip() for line in CI_RUN.splitlines()}
# The README's set-up commands start with CI's own virtualenv and install (the tests'), or with the same
# install of the main job's lighter extra (the demo's: no test stack).
CI_SETUP = 'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && '
DEMO_SETUP = CI_SETUP.replace('".[test]"', '".[demo]"')
PYTHONS = ("python", "python3", ".venv/bin/python")
REPO_PATH = re.compile(r"(?<![\w/.])((?:fastadv|kernels|tests|bench|examples|docs)/[\w./-]*)")
SCRIPT_FOLDERS = (ROOT / "bench", ROOT / "examples")
FENCE = re.compile(r"^```(.*)$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(page: Path) -> list[tuple[int, str, str]]:
    """(first line number, language, text) of each fenced block; fails on an unclosed fence or an
    indented code block (four spaces after a blank line, outside a fence)."""
    blocks, lines = [], page.read_text().splitlines()
    start, language, body = None, "", []
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if start is None and fence:
            start, language, body = number, fence.group(1).strip(), []
        elif start is not None and line == "```":
            blocks.append((start, language, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
        else:
            previous_blank = number == 1 or not lines[number - 2].strip()
            assert not (line.startswith("    ") and previous_blank), (
                f"{page_name(page)}:{number}: an indented code block; fence it with a language instead"
            )
    assert start is None, f"{page_name(page)}:{start}: a fence that is never closed"
    return blocks


BLOCKS = [(page, *block) for page in PAGES for block in fenced_blocks(page)]
BLOCK_IDS = [f"{page_name(page)}:{line}-{language or 'none'}" for page, line, language, _ in BLOCKS]


def docs_namespace(tmp_path: Path) -> dict[str, Any]:
    """What a documented Python block may assume (see the module docstring), built fresh for each block."""
    from accelerate import Accelerator
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    vocab, seq, size = 100, 8, 4
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=seq, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)

    def make_batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(1, vocab, (size, seq), generator=gen)
        labels = torch.randint(0, 2, (size,), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    examples = make_batch()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2, max_steps=2, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True,
    )  # fmt: skip
    return {
        "__name__": "docs_block",
        "model": model,
        "batch": make_batch(),
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "loader": torch.utils.data.DataLoader([make_batch(), make_batch()], batch_size=None),
        "accelerator": Accelerator(),
        "args": args,
        "dataset": [{key: value[i] for key, value in examples.items()} for i in range(size)],
    }


def diff_after(text: str) -> str:
    """The code a diff block leaves: its ``+`` and context lines, without the ``-`` ones."""
    kept = [line[1:] for line in text.splitlines() if line[:1] in ("+", " ")]
    return textwrap.dedent("\n".join(kept)) + "\n"


@functools.cache
def help_text(argv: tuple[str, ...]) -> str:
    """The ``--help`` output of ``argv``: a script (run in this process, as ``__main__``, with its folder on
    ``sys.path``, everything it changed put back) or ``("-m", module)``; it must exit 0. pytest's own help
    comes from a subprocess: a second pytest inside this one would share its plugins."""
    if argv == ("-m", "pytest"):
        done = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"pytest --help exited {done.returncode}:\n{done.stderr[-2000:]}"
        return done.stdout
    saved_argv, saved_path, saved_environ, saved_modules = sys.argv, sys.path[:], dict(os.environ), set(sys.modules)
    shadowed: dict[str, object] = {}
    sys.argv = [argv[-1], "--help"]
    output, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(output):
            if argv[0] == "-m":  # torchrun's main returns after its help (its @record takes the exit)
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                folder = (ROOT / argv[0]).parent
                # A module of that name another folder already loaded (bench/common.py, on the tests' path)
                # steps aside while the script runs, so the script imports its own sibling, as `python` would.
                shadowed = {n: sys.modules.pop(n) for n in list(sys.modules) if (folder / f"{n}.py").exists()}
                sys.path.insert(0, str(folder))
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except SystemExit as exited:
        code = exited.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_environ)
        # The script's sibling modules go (bench/common.py and examples/common.py share a name); fastadv's
        # stay, as its torch.library ops can be registered once only.
        for name in set(sys.modules) - saved_modules:
            if Path(getattr(sys.modules[name], "__file__", None) or "/").parent in SCRIPT_FOLDERS:
                del sys.modules[name]
        sys.modules.update(shadowed)
    assert code in (0, None) and "usage:" in output.getvalue(), f"{' '.join(argv)} --help exited {code}"
    return output.getvalue()


def flags(words: list[str]) -> list[str]:
    return [word.split("=")[0] for word in words if word.startswith("-") and word not in ("-m", "-q")]


def script_checks(words: list[str]) -> list[tuple[tuple[str, ...], list[str]]]:
    """For one command (its words, environment assignments removed): the (--help argv, flags it must
    list) pairs to check; asserts on the files the command names."""
    program, rest = words[0], words[1:]
    if program in PYTHONS and rest[:2] == ["-m", "pytest"]:
        paths = [word for word in rest[2:] if not word.startswith("-")]
        assert paths and all((ROOT / path).is_file() for path in paths), f"pytest on missing files: {paths}"
        return [(("-m", "pytest"), flags(rest[2:]))]
    if program == "torchrun":
        at = next(i for i, word in enumerate(rest) if word.endswith(".py"))
        return [(("-m", "torch.distributed.run"), flags(rest[:at])), *script_checks(["python", *rest[at:]])]
    assert program in PYTHONS, f"not a command the docs test knows how to check: {' '.join(words)}"
    script = ROOT / rest[0]
    assert script.is_file(), f"{rest[0]} does not exist"
    source = script.read_text()
    compile(source, str(script), "exec")
    if rest[0].startswith("bench/") and "--quick" in source:
        assert f"bench/{script.name} --quick" in CI_RUN, f".ci/run does not run {rest[0]} --quick"
    if not re.search(r"parse_args\(|ArgumentParser\(", source):  # no --help: it would run the script
        assert not flags(rest[1:]), f"{rest[0]} takes no flags: {rest[1:]}"
        return []
    return [((rest[0],), flags(rest[1:]))]


def command_checks(line: str) -> list[tuple[tuple[str, ...], list[str]]]:
    command = line.split(" #")[0].strip()
    if command in CI_LINES:  # the test command: .ci/run runs it as written
        return []
    if command.startswith(CI_SETUP):  # CI's set-up, then a script
        assert CI_SETUP + ".venv/bin/python -m pytest -q" in CI_LINES, ".ci/run no longer sets up as the docs do"
        command = command[len(CI_SETUP) :]
    elif command.startswith(DEMO_SETUP):  # the main job's install: an extra of pyproject.toml, then the demo
        assert "\ndemo = [" in (ROOT / "pyproject.toml").read_text(), "pyproject.toml has no demo extra"
        command = command[len(DEMO_SETUP) :]
        assert f"{command.strip()} --quick" in CI_LINES, f".ci/run does not run {command.strip()} --quick"
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    return script_checks(words)


@pytest.mark.parametrize(("page", "line", "language", "text"), BLOCKS, ids=BLOCK_IDS)
def test_block(page: Path, line: int, language: str, text: str, tmp_path: Path, monkeypatch) -> None:
    where = f"{page_name(page)}:{line}"
    if language in ("python", "diff"):
        monkeypatch.chdir(tmp_path)  # whatever a block writes (Lightning, Trainer) stays out of the tree
        code = text if language == "python" else diff_after(text)
        exec(compile(code, where, "exec"), docs_namespace(tmp_path))
    elif language == "bash":
        checks = [check for command in text.splitlines() if command.strip() for check in command_checks(command)]
        for argv, wanted in checks:
            missing = [flag for flag in wanted if flag not in help_text(argv)]
            assert not missing, f"{where}: {' '.join(argv)} --help does not list {missing}"
    elif language == "text":
        missing = [path for path in REPO_PATH.findall(text) if not (ROOT / path).exists()]
        assert not missing, f"{where}: names paths that do not exist: {missing}"
    else:
        pytest.fail(f"{where}: a ```{language} block; use python, diff, bash or text (and make it run here)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_links_resolve(page: Path) -> None:
    """Every relative link (pages, anchors, images) points at a file in the repository and, for a
    Markdown page, at one of its headings."""
    broken = []
    for target in LINK.findall(re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_file() or ROOT not in resolved.parents:
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{page_name(page)}: links that do not resolve: {broken}"


def test_docs_pages() -> None:
    """One docs/ page per topic, each linked from the README, and a README that stays short."""
    readme = (ROOT / "README.md").read_text()
    for topic in DOC_TOPICS:
        assert (ROOT / "docs" / f"{topic}.md").is_file(), f"docs/{topic}.md is missing"
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert "](bench/README.md" in readme, "README.md does not link bench/README.md"
    size = len(readme.encode())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move details to docs/, tables to bench/README.md"


def test_the_first_table_of_the_methods_page_names_every_method() -> None:
    """docs/methods.md opens with a table of the methods (issue 30, item 12: VAT, SMART and R3F were missing)."""
    import fastadv

    text = (ROOT / "docs" / "methods.md").read_text()
    table = text[text.index("| method |") :].split("\n\n", 1)[0]
    for name in ("FGM", "PGD", "FreeLB", "GradientPenalty", "VAT", "SMART", "R3F"):
        assert hasattr(fastadv, name)
        assert f"`{name}(model" in table, f"docs/methods.md's first table does not show {name}'s call"


def test_the_readme_gives_the_trainers_import_path_and_it_imports() -> None:
    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Hugging Face Trainer |"))
    assert "`fastadv.integrations.hf`" in row, "the README's Trainer row does not say where AdversarialTrainer lives"
    from fastadv.integrations.hf import AdversarialTrainer, adversarial_trainer  # noqa: F401


def test_the_readme_does_not_send_gradient_accumulation_to_output_mode() -> None:
    """An untied trainable table keeps weight rows under accumulation (target='auto'); the README said the
    output (issue 30, item 12)."""
    from models import batches, tiny_bert

    from fastadv import FGM
    from fastadv.targets import WeightTarget

    text = (ROOT / "README.md").read_text()
    sentence = text[text.index('`target="auto"` (default)') :].split(". ", 1)[0]
    outputs = sentence.split("else the embedding's output", 1)[1]
    assert "accumulation" not in outputs, "the README lists gradient accumulation among the output cases"
    model = tiny_bert()
    fgm = FGM(model)
    for ids, labels in batches(2):  # two accumulated micro-batches, then the attack
        model(input_ids=ids, labels=labels).loss.backward()
    fgm.attack()
    assert all(isinstance(target, WeightTarget) for target, _ in fgm._attacked)
    fgm.restore()


# The README's first block, as a newcomer types it in a Python started in the clone's root (``python -c``, a
# notebook and ``python -m`` all put that folder first on sys.path), on a small BERT from transformers, with
# fastadv's Triton kernels (interpreted on a CPU) imported from there too.
FROM_THE_ROOT = """
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel

import kernels  # Hugging Face's package, which transformers imports: the clone's kernels/ must not stand in for it
assert kernels.__file__ is not None and "site-packages" in kernels.__file__, kernels.__path__

import torch
torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
model = BertForSequenceClassification(config)
ids = torch.randint(1, 100, (2, 8))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
before = model.bert.embeddings.word_embeddings.weight.detach().clone()
BLOCK
assert torch.equal(model.bert.embeddings.word_embeddings.weight, before), "restore() left the table perturbed"
from fastadv.ops.backend import kernels as fastadv_kernels
print("ran", sorted(vars(fastadv_kernels()))[0])
"""


def test_readme_first_block_runs_from_the_repository_root():
    page = ROOT / "README.md"
    _, language, text = fenced_blocks(page)[0]
    assert language == "diff", "the README's first block is the FGM swap"
    code = FROM_THE_ROOT.replace("BLOCK\n", diff_after(text))
    environment = {**os.environ, "TRITON_INTERPRET": "1", "FASTADV_BACKEND": "triton"}
    environment.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"from the clone's root:\n{done.stderr[-3000:]}"
    assert "ran rows_backup_add_kernel" in done.stdout, done.stdout

"""What ``fastadv-run`` puts into every Python process of the command it launches (through ``sitecustomize``).

When ``transformers.trainer`` is imported, ``Trainer.train`` is wrapped: before the first step of any Trainer,
of any subclass, whatever built it, the Trainer is made adversarial with the method the environment names
(``FASTADV_METHOD``, ``FASTADV_OPTIONS`` as ``key=value,key=value``, ``FASTADV_START_STEP``), a line on stderr
says which class with which adversary, and a line goes to the launcher's marker file
(``FASTADV_RUN_MARKER``), by which the launcher knows that a Trainer was made adversarial.

This module imports neither fastadv nor torch: every process the command starts (pip, a tokenizer worker)
imports it, and only a Trainer's ``train`` pays for fastadv.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys

METHOD, OPTIONS, START_STEP, MARKER = "FASTADV_METHOD", "FASTADV_OPTIONS", "FASTADV_START_STEP", "FASTADV_RUN_MARKER"
_TARGET = "transformers.trainer"


def options_from_environment() -> dict[str, str]:
    """``FASTADV_OPTIONS`` (``epsilon=1.0,steps=3``) as a dict of strings."""
    text = os.environ.get(OPTIONS, "").strip()
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{OPTIONS}={text!r}: each option is key=value, found {item!r}.")
        options[key.strip()] = value.strip()
    return options


def make_adversarial_from_environment(trainer: object) -> None:
    """Make ``trainer`` adversarial as the environment says, log it, and mark it for the launcher."""
    from fastadv import build_adversary
    from fastadv.integrations.hf import AdversarialTrainingMixin, make_adversarial

    name = type(trainer).__name__
    if isinstance(trainer, AdversarialTrainingMixin):
        raise RuntimeError(
            f"fastadv-run: the {name} is adversarial already (its adversary: {trainer.adversary!r}), and "
            f"{METHOD}={os.environ[METHOD]!r} asks for another: run the command without fastadv-run, or build the "
            "Trainer without an adversary."
        )
    model = getattr(trainer, "model", None)
    if model is None:
        raise RuntimeError(
            f"fastadv-run: the {name} has no model when it starts training (model_init=?), so no adversary can be "
            "built on it: give the Trainer its model."
        )
    start = int(os.environ.get(START_STEP, "0") or 0)
    adversary = build_adversary(model, os.environ[METHOD], **options_from_environment())
    make_adversarial(trainer, adversary, adversary_start_step=start)
    line = f"{name} made adversarial as {type(trainer).__name__} with {adversary!r}, from optimizer step {start}"
    print(f"fastadv-run: {line}", file=sys.stderr, flush=True)
    marker = os.environ.get(MARKER)
    if marker:
        with open(marker, "a", encoding="utf-8") as file:
            file.write(f"{os.getpid()} {line}\n")


def patch(trainer_class: type) -> None:
    """Wrap ``trainer_class.train`` (transformers' Trainer) once."""
    original = trainer_class.train
    if getattr(original, "_fastadv_run", False):
        return

    @functools.wraps(original)
    def train(self, *args, **kwargs):
        if not getattr(self, "_fastadv_run_done", False):
            make_adversarial_from_environment(self)
            self._fastadv_run_done = True  # a second train() (another epoch count, a resume) keeps the adversary
        return original(self, *args, **kwargs)

    train._fastadv_run = True
    trainer_class.train = train


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``transformers.trainer`` with the other finders and patches its Trainer once it has run."""

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._loader, spec.loader = spec.loader, self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        patch(module.Trainer)


def install() -> None:
    """Patch Trainer now if transformers.trainer is loaded, else when it is imported."""
    if _TARGET in sys.modules:
        patch(sys.modules[_TARGET].Trainer)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())

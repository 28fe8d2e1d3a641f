"""The backend switch: FASTADV_BACKEND, the interpreter, a missing Triton; never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE
from models import BagOfEmbeddings, bag_loss, batches

from fastadv import FGM, BackendError
from fastadv.ops import backend as backend_module
from fastadv.ops import resolve_backend


def test_auto_picks_triton_where_kernels_run(monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "auto")
    assert resolve_backend(torch.device(DEVICE)) == "triton"  # CUDA, or CPU under TRITON_INTERPRET=1


@pytest.mark.parametrize("forced", ["torch", "triton", "TORCH", ""])
def test_forced_backend_is_reported_by_fgm(monkeypatch, forced):
    monkeypatch.setenv("FASTADV_BACKEND", forced)
    model = BagOfEmbeddings().to(DEVICE)
    fgm = FGM(model)
    assert fgm.backend is None
    ids, labels = batches(1)[0]
    fgm.step(lambda: bag_loss(model, ids, labels))
    assert fgm.backend == (forced.lower() or "triton")


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "cuda")
    with pytest.raises(BackendError, match="FASTADV_BACKEND='cuda' is not one of auto, torch, triton"):
        resolve_backend(torch.device("cpu"))


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(backend_module, "_kernels_interpreted", lambda: False)
    monkeypatch.setenv("FASTADV_BACKEND", "triton")
    with pytest.raises(BackendError, match="interpreter is off"):
        resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("FASTADV_BACKEND", "auto")
    assert resolve_backend(torch.device("cpu")) == "torch"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTADV_BACKEND")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, timeout=120
    )


ATTACK_ON_CPU = """
    import torch
    from fastadv import FGM
    emb = torch.nn.Embedding(20, 6)
    fgm = FGM(emb)
    emb(torch.tensor([[1, 2, 2]])).sum().backward()
    fgm.attack()
    fgm.restore()
    print("backend", fgm.backend)
"""


def test_without_triton_installed_the_torch_path_runs():
    blocked = "import sys; sys.modules['triton'] = None\n" + textwrap.dedent(ATTACK_ON_CPU)
    result = run_python(blocked)
    assert result.returncode == 0, result.stderr
    assert "backend torch" in result.stdout
    forced = run_python(blocked, FASTADV_BACKEND="triton")
    assert forced.returncode != 0 and "triton is not installed" in forced.stderr


def test_cpu_default_without_interpreter_is_torch_and_forced_triton_fails():
    result = run_python(ATTACK_ON_CPU)
    assert result.returncode == 0, result.stderr
    assert "backend torch" in result.stdout
    forced = run_python(ATTACK_ON_CPU, FASTADV_BACKEND="triton")
    assert forced.returncode != 0 and "BackendError" in forced.stderr and "TRITON_INTERPRET=1" in forced.stderr


def test_importing_fastadv_imports_neither_triton_nor_transformers():
    result = run_python("import sys, fastadv; print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

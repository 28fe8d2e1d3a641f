"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; TRITON_INTERPRET
must be set before fastadv first imports its kernels, so it is set here, at collection. With a
GPU the same tests run the compiled kernels on CUDA tensors, half precision included.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# `python -m pytest` puts the working directory, the repository's root, first on sys.path, where `import
# fastadv` would take the checkout's folder whatever is installed. The tests import fastadv as installed (a
# wheel's or the editable's), never from there. (test_docs.py runs the README from the root, as users do.)
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' tables are small: on a CPU fastadv would leave them to torch's dense backward (the rows do not
# pay below fastadv.targets.row_gradients.CPU_MIN_ROW_ELEMENTS). The suite takes the rows wherever they are
# exact, so that they are tested on every table; test_row_gradients.py tests the default's choice.
os.environ.setdefault("FASTADV_ROW_GRADIENTS", "1")

import pytest  # noqa: E402
from sync_checks import static_row_sets  # noqa: E402

BACKENDS = ("torch", "triton")
# Half precision through the kernels needs a GPU: the interpreter's fp16/bf16 support is not the
# contract (fp32 is). The torch path is checked in every dtype on any device.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16) if DEVICE == "cuda" else (torch.float32,)
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def backend_dtype_cases() -> list:
    """(backend, dtype) pairs that run here: every dtype on the torch path, KERNEL_DTYPES on Triton."""
    cases = [pytest.param("torch", d, id=f"torch-{dtype_id(d)}") for d in ALL_DTYPES]
    cases += [pytest.param("triton", d, id=f"triton-{dtype_id(d)}") for d in KERNEL_DTYPES]
    return cases


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force fastadv's backend for the test, as a user would, through FASTADV_BACKEND."""
    monkeypatch.setenv("FASTADV_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (on a CPU shared with other jobs, each multithreaded small op
    waits for the busy core: 10 to 100x slower here). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def static_rows() -> Iterator[None]:
    """Row sets and segment sums take their CUDA form on any device: static shapes (sorted ids,
    first-occurrence flags, min(N, V) slots), no torch.unique (sync_checks.static_row_sets)."""
    with static_row_sets():
        yield


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """assert_close that names the quantity and shows the worst elements when it fails."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = "; ".join(
            f"{tuple(i)}: got {actual[tuple(i)].item():.8g}, want {expected[tuple(i)].item():.8g}" for i in idx
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond rtol={rtol}, atol={atol} "
            f"(max abs diff {diff.max().item():.3g}); first: {rows}"
        )


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def parameter_gradients(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter gradient of ``model`` that is set, flattened into one vector."""
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

"""pytest-benchmark: attack+restore, the copied snippet vs fastadv.FGM, side by side per vocabulary size.

    /tmp/venv/bin/python -m pytest bench/test_bench_fgm.py --benchmark-only       # measure
    /tmp/venv/bin/python -m pytest bench/test_bench_fgm.py --benchmark-disable    # run each once (smoke)

Each benchmarked call is an attack() followed by restore(), so it leaves the weight as it found it;
that is asserted bitwise afterwards, and fastadv's restore must also keep the weight's storage.
CPU only, on fastadv's torch path (Triton's CPU interpreter is a test tool, not a fast path).
"""

from __future__ import annotations

import pytest
import torch
from fgm_cases import AttackCase, make_attack_case

DIM = 768
VOCABS = (32000, 128000)


@pytest.fixture(scope="module", params=VOCABS, ids=lambda v: f"V{v // 1000}k")
def case(request: pytest.FixtureRequest) -> AttackCase:
    """One pair of models per vocabulary size, shared by the snippet's and fastadv's benchmark."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTADV_BACKEND", "torch")
        yield make_attack_case(request.param, DIM, "cpu")


@pytest.mark.parametrize("impl", ["snippet", "fastadv"])
def test_attack_restore(benchmark, case: AttackCase, impl: str) -> None:
    vocab = case.original.shape[0]
    benchmark.group = f"attack+restore V={vocab} d={DIM} batch 32x128"
    benchmark.extra_info.update(vocab=vocab, dim=DIM, impl=impl)
    ptr = case.fastadv_weight.data_ptr()

    benchmark(case.snippet_pair if impl == "snippet" else case.fastadv_pair)

    case.check_restored()  # bitwise, both models
    assert case.fastadv_weight.data_ptr() == ptr, "fastadv restore must write back into the same storage"
    if impl == "fastadv":
        assert case.fgm.backend == "torch"


def test_attacks_agree(case: AttackCase) -> None:
    """The two benchmarks time the same numbers: after attack the weights agree, only batch rows change."""
    stats = case.agreement()  # asserts max rel diff <= 1e-5, norm == epsilon, rows within the batch
    assert stats["changed_rows"] == torch.unique(case.ids).numel()

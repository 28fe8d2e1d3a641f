"""pytest-benchmark: one PGD (K = 3) training step's passes, the copied snippet's loop vs fastadv's pgd.step.

    /tmp/venv/bin/python -m pytest bench/test_bench_pgd.py --benchmark-only       # measure
    /tmp/venv/bin/python -m pytest bench/test_bench_pgd.py --benchmark-disable    # run each once (smoke)

A 2-layer BERT classifier (hidden 256, vocabulary 128k, batch 16 x 128) on CPU, fastadv's torch
path. Each benchmarked call starts from zeroed gradients and ends with the embedding restored
(asserted bitwise afterwards); the two implementations' gradients are checked to agree.
bench/pgd.py prints the same comparison with peak memory and the bytes of gradient copies.
"""

from __future__ import annotations

import copy

import pytest
import torch
from common import bert_classifier
from pgd import ALPHA, EMB_NAME, EPSILON, K, snippet_loop

from fastadv import PGD
from fastadv.snippets import SnippetPGD


@pytest.fixture(scope="module")
def case() -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTADV_BACKEND", "torch")
        base = bert_classifier(128000, 256, 2, 128, torch.device("cpu"))
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 128000, (16, 128), generator=gen)
        labels = torch.randint(0, 2, (16,), generator=gen)
        models = {"snippet": base, "fastadv_step": copy.deepcopy(base)}
        yield {
            "models": models,
            "table": base.get_input_embeddings().weight.detach().clone(),
            "snippet": SnippetPGD(models["snippet"]),
            "fastadv_step": PGD(models["fastadv_step"], EPSILON, ALPHA, K, emb_name=EMB_NAME),
            "closure": lambda model: model(input_ids=ids, labels=labels).loss,
        }


@pytest.mark.parametrize("impl", ["snippet", "fastadv_step"])
def test_pgd_training_step(benchmark, case: dict, impl: str) -> None:
    model, adversary = case["models"][impl], case[impl]
    benchmark.group = f"PGD K={K} step, BERT 2x256, V=128k, batch 16x128"

    def run() -> None:
        model.zero_grad(set_to_none=True)
        if impl == "snippet":
            snippet_loop(model, adversary, lambda: case["closure"](model))
        else:
            adversary.step(lambda: case["closure"](model))

    benchmark(run)
    assert torch.equal(model.get_input_embeddings().weight, case["table"]), "the embedding was left perturbed"


def test_both_give_the_same_gradient(case: dict) -> None:
    grads = {}
    for impl, model in case["models"].items():
        model.zero_grad(set_to_none=True)
        if impl == "snippet":
            snippet_loop(model, case[impl], lambda model=model: case["closure"](model))
        else:
            case[impl].step(lambda model=model: case["closure"](model))
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    diff = (grads["fastadv_step"] - grads["snippet"]).norm() / grads["snippet"].norm()
    assert diff.item() <= 1e-6

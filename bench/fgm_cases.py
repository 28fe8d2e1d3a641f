"""Set-ups shared by the FGM benchmarks: the snippet and fastadv on identical copies of one model.

Imported by ``bench/snippet_vs_fastadv.py`` (run as a script, so ``bench/`` is on ``sys.path``) and
by ``bench/test_bench_fgm.py`` (pytest puts the test file's folder on ``sys.path``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fastadv import FGM
from fastadv.snippets import SnippetFGM

EPSILON = 1.0
SNIPPET_EMB_NAME = "emb."  # matches TinyEmbeddingModel's "emb.weight" only
BATCH, SEQ = 32, 128


class TinyEmbeddingModel(nn.Module):
    """An nn.Embedding and nothing else: the attack's cost without a network around it."""

    def __init__(
        self, vocab: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


@dataclass
class AttackCase:
    """Two identical models after the same clean backward: one for the snippet, one for fastadv."""

    snippet_model: TinyEmbeddingModel
    fastadv_model: TinyEmbeddingModel
    snippet: SnippetFGM
    fgm: FGM
    original: torch.Tensor  # the weight before any attack, to check restores bit for bit
    ids: torch.Tensor

    @property
    def snippet_weight(self) -> torch.Tensor:
        return self.snippet_model.emb.weight.data

    @property
    def fastadv_weight(self) -> torch.Tensor:
        return self.fastadv_model.emb.weight.data

    def snippet_attack(self) -> None:
        self.snippet.attack(EPSILON, SNIPPET_EMB_NAME)

    def snippet_restore(self) -> None:
        self.snippet.restore(SNIPPET_EMB_NAME)

    def snippet_pair(self) -> None:
        self.snippet.attack(EPSILON, SNIPPET_EMB_NAME)
        self.snippet.restore(SNIPPET_EMB_NAME)

    def fastadv_attack(self) -> None:
        self.fgm.attack(EPSILON)

    def fastadv_restore(self) -> None:
        self.fgm.restore()

    def fastadv_pair(self) -> None:
        self.fgm.attack(EPSILON)
        self.fgm.restore()

    def check_restored(self) -> None:
        """Both weights bitwise equal to the original (raises AssertionError otherwise)."""
        assert torch.equal(self.snippet_weight, self.original), "snippet left its weight changed"
        assert torch.equal(self.fastadv_weight, self.original), "fastadv left its weight changed"

    def agreement(self) -> dict[str, float]:
        """Attack both, compare the perturbed weights, restore both. Raises when they disagree.

        Returns:
            max_rel_diff: max |W_snippet - W_fastadv| / max |W_snippet| over the whole table (<= 1e-5 in
                fp32; in bf16/fp16 <= the dtype's eps, one rounding of the largest weight: the snippet
                rounds g / norm and the sum to the table's dtype, fastadv rounds once, from fp32);
            delta_rel_diff: ||d_snippet - d_fastadv|| / ||d_fastadv|| of the perturbations d = W - W_original
                (fp32: <= 1e-3; about 1e-4 on CPU, where torch's fp32 norm of the whole gradient, the snippet's,
                is itself off by about 6e-5);
            perturbation_norm: ||d_fastadv||, epsilon for FGM in fp32 (so the attack did something). In
                bf16/fp16 both are reported, not checked: a perturbation below half a unit in the last place
                of a weight rounds away, in the snippet and in fastadv alike;
            changed_rows: rows fastadv changed, which must be among the batch's ids (as the snippet's must).
        """
        self.check_restored()
        self.snippet_attack()
        self.fastadv_attack()
        try:
            s, f = self.snippet_weight, self.fastadv_weight
            max_rel = ((s - f).abs().max() / s.abs().max()).item()
            changed = (f != self.original).any(dim=1).nonzero().flatten()
            # Perturbations on the changed rows only, in fp64 (whole-table fp32 norms are not accurate enough).
            orig = self.original.index_select(0, changed).double()
            d_s = s.index_select(0, changed).double() - orig
            d_f = f.index_select(0, changed).double() - orig
            norm = d_f.norm().item()
            delta_rel = ((d_s - d_f).norm() / d_f.norm().clamp_min(1e-30)).item()
            snippet_changed = (s != self.original).any(dim=1).nonzero().flatten()
        finally:
            self.snippet_restore()
            self.fastadv_restore()
        self.check_restored()
        batch_rows = torch.unique(self.ids)
        assert torch.isin(changed, batch_rows).all(), "fastadv changed rows outside the batch"
        assert torch.isin(snippet_changed, batch_rows).all(), "the snippet changed rows outside the batch"
        fp32 = self.original.dtype == torch.float32
        max_rel_tol = 1e-5 if fp32 else torch.finfo(self.original.dtype).eps
        assert max_rel <= max_rel_tol, f"snippet and fastadv disagree after attack: max relative diff {max_rel:.3g}"
        if fp32:
            assert snippet_changed.numel() <= changed.numel(), "the snippet changed rows fastadv left alone"
            assert delta_rel <= 1e-3, f"snippet and fastadv perturbations differ by {delta_rel:.3g} (relative)"
            assert abs(norm - EPSILON) <= 1e-4 * EPSILON, f"perturbation norm {norm:.6g}, expected {EPSILON}"
        return {
            "max_rel_diff": max_rel,
            "delta_rel_diff": delta_rel,
            "perturbation_norm": norm,
            "changed_rows": float(changed.numel()),
        }


def make_attack_case(
    vocab: int,
    dim: int,
    device: torch.device | str = "cpu",
    batch: int = BATCH,
    seq: int = SEQ,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> AttackCase:
    """nn.Embedding(vocab, dim) in ``dtype`` twice, the same batch's clean backward on both, snippet and FGM attached.

    The loss is ``(emb(ids) * r).sum()`` with a fixed random ``r``, so exactly the batch's rows of the
    weight gradient are non-zero. FGM is created before the forward pass, as it must be.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        snippet_model = TinyEmbeddingModel(vocab, dim, device, dtype)
    fastadv_model = copy.deepcopy(snippet_model)
    snippet = SnippetFGM(snippet_model)
    fgm = FGM(fastadv_model)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    r = torch.randn(batch, seq, dim, generator=gen).to(device, dtype)
    for model in (snippet_model, fastadv_model):
        (model(ids) * r).sum().backward()
    grad = snippet_model.emb.weight.grad
    # One gradient for both, bit for bit: CUDA's embedding backward need not be deterministic.
    fastadv_model.emb.weight.grad.copy_(grad)
    nonzero_rows = grad.ne(0).any(dim=1).sum().item()
    assert nonzero_rows == torch.unique(ids).numel(), "the gradient should be non-zero on the batch's rows only"
    original = snippet_model.emb.weight.detach().clone()
    return AttackCase(snippet_model, fastadv_model, snippet, fgm, original, ids)

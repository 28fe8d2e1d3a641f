"""FGM's step captured in a CUDA graph and replayed on a new batch does what the eager step does.

Without CUDA the same steps and checks run eagerly (the "replay" is the step run again on the static
buffers), so the comparison itself is exercised on a CPU, with the row sets in their CUDA form.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, parameter_gradients, relative_difference
from measure import synchronize
from models import VOCAB, SmallLM, token_batch
from torch import nn

from fastadv import FGM

EPSILON = 1.0


class AdversarialOutput:
    """Copies the embedding's output during the adversarial pass into one static buffer (a forward hook
    registered after fastadv's, so it sees the perturbed output): what the adversarial pass saw."""

    def __init__(self, module: nn.Module) -> None:
        self.armed = False
        self.buffer: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.armed:
            if self.buffer is None:  # allocated by the first (eager) step, before any capture
                self.buffer = torch.empty_like(output)
            self.buffer.copy_(output)


def fgm_step(model: SmallLM, fgm: FGM, ids: torch.Tensor, labels: torch.Tensor, probe: AdversarialOutput) -> None:
    """zero_grad, clean forward/backward, attack, adversarial forward/backward, restore (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    model(ids, labels).backward()
    fgm.attack()
    probe.armed = True
    model(ids, labels).backward()
    probe.armed = False
    fgm.restore()


def warm_up_and_capture(model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    """Runs ``step`` three times, then on CUDA captures it in a graph; returns what replays it."""
    if DEVICE != "cuda":
        for _ in range(3):
            step()
        return step
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs' docs require
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)  # as the docs do: the capture allocates the gradients in its pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.mark.parametrize("target", ["weight", "output"])
def test_a_replay_on_a_new_batch_matches_the_eager_step(static_rows, target):
    """Capture fgm_step in a CUDA graph on one batch, replay it on another, compare with the eager step.

    Python runs once, at capture. fastadv's hooks record the batch's ids as ``ids.detach()``, a view of
    the static input buffer, not a copy, and every tensor made from it (sorted ids, first flags, the
    slots, dL/de summed per id in output mode, the saved rows) is made by captured kernels, into the
    graph's memory. A replay runs those kernels on whatever the static buffers hold, so a new batch
    copied into them is perturbed on its own rows. The two batches here use disjoint ids (lower and
    upper half of the vocabulary): a row set frozen at capture would leave the new batch unperturbed
    and differ from the eager step. What a graph cannot follow is what it fixes anyway: shapes, and
    the number of lookups and backward passes per step (so no gradient accumulation across replays).
    fastadv's skip counter, read on the host, reflects the last replay only.
    """
    model = SmallLM()
    twin = copy.deepcopy(model)  # before any hook: a deepcopy would copy the hooks too
    fgm, twin_fgm = FGM(model, EPSILON, target=target), FGM(twin, EPSILON, target=target)
    probe, twin_probe = AdversarialOutput(model.emb), AdversarialOutput(twin.emb)
    original = model.emb.weight.detach().clone()
    static_ids, static_labels = token_batch(seed=1, high=VOCAB // 2)
    new_ids, new_labels = token_batch(seed=2, low=VOCAB // 2)

    replay = warm_up_and_capture(model, lambda: fgm_step(model, fgm, static_ids, static_labels, probe))
    static_ids.copy_(new_ids)
    static_labels.copy_(new_labels)
    replay()
    fgm_step(twin, twin_fgm, new_ids, new_labels, twin_probe)
    synchronize(DEVICE)

    clean = F.embedding(new_ids, original)
    moved = (probe.buffer - clean).abs().amax(dim=-1) > 0  # [B, T]: positions the replay perturbed
    assert moved[new_ids != 0].all(), "the replay left some of the new batch's tokens unperturbed"
    assert torch.equal(model.emb.weight, original), "after the replay, restore() did not put the weights back"
    assert torch.equal(twin.emb.weight, original), "after the eager step, restore() did not put the weights back"
    # The replay runs the eager step's kernels on the same inputs: equal up to the order of fp32 sums in
    # kernels free to change it (cuBLAS split-K, atomics), ~sqrt(B*T) * 2^-24 relative, far under 1e-5;
    # a wrong or stale row set moves the result by O(1).
    grad_diff = relative_difference(parameter_gradients(model), parameter_gradients(twin))
    assert grad_diff <= 1e-5, f"graph replay vs eager: gradients differ by {grad_diff:.3g} (relative)"
    output_diff = (probe.buffer - twin_probe.buffer).abs().max().item()
    assert output_diff <= 1e-5 * clean.abs().max().item(), f"perturbed outputs differ by {output_diff:.3g}"

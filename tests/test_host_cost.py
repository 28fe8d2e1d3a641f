"""Nothing fastadv does per step grows with the number of parameters (issue 29).

For every method, the aten ops one whole step dispatches grow from a shallow model to a deeper one by exactly
what its passes add: the growth of the same passes run bare (a forward and a full backward, a forward alone,
a forward and a backward to the embedding output alone) plus one add per parameter where a pass adds into
gradients an earlier pass left. A later change that adds work per parameter (a hook that tests each gradient,
a per-tensor loop) makes the growth larger, and this fails. Counted with bench/host_cost.py's dispatch mode;
times are that script's, not a test's."""

from __future__ import annotations

import pytest
import torch
from host_cost import bert_spec, build_pair, count_dispatched_ops, qwen2_spec, steps_for

# A method's own ops may differ by a few between depths where they depend on the model's shape (none does
# today); an op per parameter adds one per parameter of the added layers: 96 on BERT, 9 on the Qwen2 here.
HANDFUL = 4
SPECS = {"bert": (bert_spec, (2, 4)), "qwen2": (qwen2_spec, (1, 2))}

# Each method's passes (K = 3 for PGD and FreeLB, one inner pass for VAT and SMART, as host_cost.py runs them):
# how many of each bare pass, and how many times a pass adds into the gradients an earlier pass left (autograd
# adds the second into .grad, or two branches of one backward in its input buffer: one op per parameter).
PASSES = {
    "fgm": {"full": 2, "adds": 1},
    "pgd": {"full": 2, "to_embedding": 2, "adds": 1},
    "gp": {"full": 1, "to_embedding": 1},
    "freelb": {"full": 3, "adds": 2},
    "vat": {"full": 2, "to_embedding": 1, "adds": 1},
    "smart": {"full": 2, "to_embedding": 1, "adds": 1},
    "r3f": {"full": 2, "adds": 1},
}
CASES = [(m, "bert") for m in PASSES] + [(m, "qwen2") for m in ("vat", "smart", "r3f")]


def bare_passes(model: str, layers: int) -> dict[str, int]:
    """The ops of each bare pass on a model no fastadv object has touched, and its trainable parameters."""
    spec = SPECS[model][0](layers)
    net, batch = spec.build(), spec.make_batch()
    embedding = net.get_input_embeddings()
    rest = {k: v for k, v in batch.items() if k != "input_ids"}

    def full() -> None:
        net.zero_grad(set_to_none=True)
        net(**batch).loss.backward()

    def to_embedding() -> None:
        e = embedding(batch["input_ids"]).detach().requires_grad_()
        torch.autograd.grad(net(inputs_embeds=e, **rest).loss, e)

    counts = {
        name: sum(count_dispatched_ops(step).values())
        for name, step in [("full", full), ("to_embedding", to_embedding)]
    }
    return counts | {"adds": sum(1 for p in net.parameters() if p.requires_grad)}


def ops(step) -> int:
    return sum(count_dispatched_ops(step).values())


@pytest.mark.parametrize(("method", "model"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_a_step_grows_with_the_model_by_what_its_passes_add_alone(method, model):
    shallow, deep = SPECS[model][1]
    bare = {layers: bare_passes(model, layers) for layers in (shallow, deep)}
    expected = sum(n * (bare[deep][kind] - bare[shallow][kind]) for kind, n in PASSES[method].items())
    grown = ops(steps_for(method, deep, model)[0]) - ops(steps_for(method, shallow, model)[0])
    assert abs(grown - expected) <= HANDFUL, (
        f"{method} on {model}: its step grows by {grown} ops from {shallow} to {deep} layers, its passes alone by "
        f"{expected}: something fastadv does per step grows with the parameters"
    )


def test_fgm_step_dispatches_at_most_60_ops_more_than_the_snippet():
    fastadv_step, snippet_step = steps_for("fgm", 2)
    assert ops(fastadv_step) - ops(snippet_step) <= 60


def test_the_pin_sees_an_op_per_parameter():
    """The test above can fail: a check of every gradient as autograd adds it (the NaN rule before issue 29
    ran one) shows as growth beyond the passes'."""
    shallow, deep = SPECS["bert"][1]

    def check(param: torch.Tensor) -> None:
        torch.isfinite(param.grad).all()

    def fgm_ops_with_a_check_per_gradient(layers: int) -> int:
        pair = build_pair("fgm", bert_spec(layers))
        for param in pair.fastadv_model.parameters():
            param.register_post_accumulate_grad_hook(check)
        return ops(pair.fastadv)

    bare = {layers: bare_passes("bert", layers) for layers in (shallow, deep)}
    expected = sum(n * (bare[deep][kind] - bare[shallow][kind]) for kind, n in PASSES["fgm"].items())
    grown = fgm_ops_with_a_check_per_gradient(deep) - fgm_ops_with_a_check_per_gradient(shallow)
    assert grown - expected > HANDFUL

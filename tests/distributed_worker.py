"""A training run in one process of a gloo group, for tests/test_distributed.py (spawned, never collected).

Each rank trains the same config-built model on its share of every batch and rank 0 saves the
final weights, which the test compares with one process trained on whole batches.
"""

from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist

from fastadv.snippets import pgd_snippet_step


def train(model: torch.nn.Module, adversary, data: list, steps_on: str, lr: float = 0.1) -> None:
    with noise_of_ids():  # VAT, SMART, R3F: a rank's half batch gets one process's noise
        _train(model, adversary, data, steps_on, lr)


@contextlib.contextmanager
def noise_of_ids():
    """VAT's, SMART's and R3F's noise drawn by :func:`noise_of_the_ids` while the block runs."""
    import fastadv.methods.consistency as consistency

    drawn, consistency.random_like = consistency.random_like, noise_of_the_ids
    try:
        yield
    finally:
        consistency.random_like = drawn


def _train(model: torch.nn.Module, adversary, data: list, steps_on: str, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outputs = type(adversary).__name__ in ("VAT", "SMART", "R3F")  # their closure returns the model's output
    for ids, labels in data:
        closure = lambda ids=ids, labels=labels: model(input_ids=ids, labels=labels)  # noqa: E731
        closure = closure if outputs else lambda closure=closure: closure().loss
        if steps_on == "step":
            adversary.step(closure)
        elif steps_on == "step_no_sync":
            adversary.step(closure, clean_no_sync=True)
        elif hasattr(adversary, "backup_grad"):  # PGD, the snippet's calls
            pgd_snippet_step(model, adversary, closure, adversary.steps)
        else:  # FGM, the snippet's calls
            closure().backward()
            adversary.attack()
            closure().backward()
            adversary.restore()
        opt.step()
        opt.zero_grad()


def make_adversary(model: torch.nn.Module, method: str):
    """fgm_* / pgd_* / gp_* / freelb_* / vat_* / smart_* / r3f_*; "_positions": output mode with one delta per
    token position."""
    from fastadv import FGM, PGD, R3F, SMART, VAT, FreeLB, GradientPenalty

    share_rows = "_positions" not in method
    if method.startswith("fgm"):
        return FGM(model, share_rows=share_rows)
    if method.startswith("gp"):
        return GradientPenalty(model, 0.5)
    if method.startswith("freelb"):
        return FreeLB(model, adv_lr=0.05, adv_steps=2)
    if method.startswith("vat"):
        return VAT(model, epsilon=1.0, xi=0.3)
    if method.startswith("smart"):
        proximal = dict(proximal_weight=2.0, proximal_momentum=0.5) if "_proximal" in method else {}
        return SMART(model, epsilon=0.05, step_size=0.02, noise_var=0.01, steps=2, **proximal)
    if method.startswith("r3f"):
        return R3F(model, epsilon=0.3)
    return PGD(model, 0.05, 0.03, share_rows=share_rows)


def noise_of_the_ids(kind: str, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """VAT's, SMART's and R3F's noise (B x T x d) as a function of each position's id and index alone."""
    position = torch.arange(ids.shape[1])[None, :, None]
    feature = torch.arange(output.shape[-1])[None, None, :]
    return torch.sin(ids[..., None] * 0.37 + position * 1.3 + feature * 0.71)


def schedule(method: str) -> str:
    """How ``train`` drives the adversary: "calls" (the snippet's), "step", or "step_no_sync" (DDP only)."""
    words = ("fgm_", "pgd_", "gp_", "freelb_", "vat_", "smart_", "r3f_")
    words += ("bound_", "before_", "module_", "frozen_", "positions_", "bucketview_", "proximal_")
    for word in words:
        method = method.replace(word, "")
    return method


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (an FSDP2 shard gathered), keyed by its name without wrapper prefixes."""
    state = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if type(p).__name__ == "DTensor" else p
        state[name.removeprefix("module.")] = t.detach().clone()
    return state


def worker(rank: int, world: int, init_file: str, engine: str, method: str, out: str) -> None:
    """One run of ``method``; rank 0 saves its final weights to ``out``."""
    worker_cases(rank, world, init_file, engine, {method: out})


def worker_cases(rank: int, world: int, init_file: str, engine: str, outs: dict[str, str]) -> None:
    """A run per method, one after the other in one process group (starting processes costs more than
    training); rank 0 saves each run's final weights to ``outs[method]``."""
    os.environ["FASTADV_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for method, out in outs.items():
            result = CHECKS[method]() if method in CHECKS else run(rank, world, engine, method)
            if rank == 0:
                torch.save(result, out)
        # Every rank's queued work done before the group goes: a gloo worker thread still holding an async
        # work's tensors at teardown aborts the process ("terminate called without an active exception"). Not
        # after an error: the other rank may be inside another collective, and the barrier would wait for it.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rank: int, world: int, engine: str, method: str) -> dict[str, torch.Tensor]:
    """Train as ``method`` says on this rank's share of every batch; the final weights.

    Where the adversary is built: on the wrapped model (default); "_bound": on the bare model, told of
    DDP after wrapping (as Trainer does); "_before": on the bare model, never told (``fgm = FGM(model)``
    then ``model = DDP(model)``); "_module": on ``ddp_model.module``. The last two find the wrapper in
    the forward pass.
    """
    from models import batches, tiny_bert

    model = tiny_bert()
    if "_frozen" in method:  # as under LoRA/PEFT: fastadv perturbs the lookup's output
        model.get_input_embeddings().weight.requires_grad_(False)
    built_before = "_bound" in method or "_before" in method
    if built_before:
        adversary = make_adversary(model, method)
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # "_bucketview": .grad is a view into DDP's buckets, which the rows are added into in place
        model = DistributedDataParallel(model, gradient_as_bucket_view="_bucketview" in method)
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if "_bound" in method:
        adversary.bind_data_parallel(model)
    elif "_module" in method:
        adversary = make_adversary(model.module, method)
    elif not built_before:
        adversary = make_adversary(model, method)
    share = lambda t: t.chunk(world)[rank]  # noqa: E731
    data = [(share(ids), share(labels)) for ids, labels in batches(3, batch=4)]
    train(model, adversary, data, schedule(method))
    return full_state(model)


def warnings_after_no_sync_forward() -> list[str]:
    """FGM built before DDP wraps the model, whose first forward runs under ``no_sync()``: the attack's
    warnings (none when that forward told FGM of the wrapper, as any DDP forward does)."""
    import warnings

    from models import batches, tiny_bert
    from torch.nn.parallel import DistributedDataParallel

    from fastadv import FGM, FastAdvWarning

    model = tiny_bert()
    fgm = FGM(model)
    ddp = DistributedDataParallel(model)
    ids, labels = batches(1, batch=4)[0]
    with ddp.no_sync():
        ddp(input_ids=ids, labels=labels).loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fgm.attack()
    fgm.restore()
    return [str(w.message) for w in caught if issubclass(w.category, FastAdvWarning)]


def row_lookups_under_ddp() -> dict[str, int]:
    """FGM.step under DDP with bucket views and zero_grad(set_to_none=False), clean_no_sync=True from the
    second step: how many passes added the word table's gradient as rows (fastadv.ops.lookup.compact_ids
    calls for its V rows), and in how many steps the table's .grad was still a view into DDP's buckets
    (its storage shared with other parameters' gradients)."""
    from unittest import mock

    from models import VOCAB, batches, tiny_bert
    from torch.nn.parallel import DistributedDataParallel

    import fastadv.ops.lookup as lookup
    from fastadv import FGM

    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(tiny_bert(), gradient_as_bucket_view=True)
    weight = model.module.get_input_embeddings().weight
    fgm, opt = FGM(model), torch.optim.SGD(model.parameters(), lr=0.1)
    compact, calls, in_bucket = lookup.compact_ids, [], 0

    def counted(ids: torch.Tensor, num_rows: int, *args, **kwargs):
        calls.extend([1] if num_rows == VOCAB else [])
        return compact(ids, num_rows, *args, **kwargs)

    with mock.patch.object(lookup, "compact_ids", counted):
        for i, (ids, labels) in enumerate(batches(3, batch=4)):
            ids, labels = ids.chunk(world)[rank], labels.chunk(world)[rank]
            fgm.step(lambda ids=ids, labels=labels: model(input_ids=ids, labels=labels).loss, clean_no_sync=i > 0)
            storage = weight.grad.untyped_storage().data_ptr()
            shared = [
                p for p in model.parameters() if p.grad is not None and p.grad.untyped_storage().data_ptr() == storage
            ]
            in_bucket += int(len(shared) > 1)
            opt.step()
            opt.zero_grad(set_to_none=False)  # .grad stays: every later pass adds its rows into the bucket view
    return {"row_backwards": len(calls), "grad_in_bucket": in_bucket}


def warnings_of_fsdp2_snippet_calls() -> list[str]:
    """FGM's snippet calls on an FSDP2-sharded BERT for two steps: the FastAdvWarnings they raised (none: each
    rank's shard of the gradient holds rows other ranks looked up, which is no bypassed lookup)."""
    import warnings

    from models import batches, tiny_bert
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastadv import FGM, FastAdvWarning

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_bert()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fgm = FGM(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ids, labels in batches(2, batch=4):
            ids, labels = ids.chunk(world)[rank], labels.chunk(world)[rank]
            model(input_ids=ids, labels=labels).loss.backward()
            fgm.attack()
            model(input_ids=ids, labels=labels).loss.backward()
            fgm.restore()
            model.zero_grad()
    return [str(w.message) for w in caught if issubclass(w.category, FastAdvWarning)]


CHECKS = {
    "warnings_of_fsdp2_snippet_calls": warnings_of_fsdp2_snippet_calls,
    "warnings_after_no_sync_forward": warnings_after_no_sync_forward,
    "row_lookups_under_ddp": row_lookups_under_ddp,
}  # run by worker_cases by name

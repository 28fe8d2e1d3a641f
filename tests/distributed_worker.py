"""A training run in one process of a gloo group, for tests/test_distributed.py (spawned, never collected).

Each rank trains the same config-built model on its share of every batch and rank 0 saves the
final weights, which the test compares with one process trained on whole batches.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def train(model: torch.nn.Module, adversary, data: list, steps_on: str, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for ids, labels in data:
        closure = lambda ids=ids, labels=labels: model(input_ids=ids, labels=labels).loss  # noqa: E731
        if steps_on == "step":
            adversary.step(closure)
        elif steps_on == "step_no_sync":
            adversary.step(closure, clean_no_sync=True)
        elif hasattr(adversary, "backup_grad"):  # PGD, the snippet's calls
            closure().backward()
            adversary.backup_grad()
            for t in range(adversary.steps):
                adversary.attack(is_first_attack=t == 0)
                if t != adversary.steps - 1:
                    model.zero_grad()
                else:
                    adversary.restore_grad()
                closure().backward()
            adversary.restore()
        else:  # FGM, the snippet's calls
            closure().backward()
            adversary.attack()
            closure().backward()
            adversary.restore()
        opt.step()
        opt.zero_grad()


def make_adversary(model: torch.nn.Module, method: str):
    """fgm_* / pgd_*; "_positions": output mode with one delta per token position."""
    from fastadv import FGM, PGD

    share_rows = "_positions" not in method
    if method.startswith("fgm"):
        return FGM(model, share_rows=share_rows)
    return PGD(model, 0.05, 0.03, share_rows=share_rows)


def schedule(method: str) -> str:
    """How ``train`` drives the adversary: "calls" (the snippet's), "step", or "step_no_sync" (DDP only)."""
    for word in ("fgm_", "pgd_", "bound_", "frozen_", "positions_"):
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
    os.environ["FASTADV_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from models import batches, tiny_bert

        from fastadv import FGM

        model = tiny_bert()
        if "_frozen" in method:  # as under LoRA/PEFT: fastadv perturbs the lookup's output
            model.get_input_embeddings().weight.requires_grad_(False)
        bound_later = "_bound" in method  # built on the bare model, told of DDP after wrapping (as Trainer does)
        if bound_later:
            adversary = FGM(model)
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        elif engine == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.bert.encoder.layer:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        if bound_later:
            adversary.bind_data_parallel(model)
        else:
            adversary = make_adversary(model, method)
        share = lambda t: t.chunk(world)[rank]  # noqa: E731
        data = [(share(ids), share(labels)) for ids, labels in batches(3, batch=4)]
        train(model, adversary, data, schedule(method))
        state = full_state(model)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()

"""FGM under DDP or FSDP2, launched with torchrun: CPU (gloo) or one GPU per process (nccl).

Each process trains the same small BERT (random weights, from a config) on its share of every
batch. Under DDP fastadv perturbs the rows of every rank's tokens in the averaged gradient; under
FSDP2 (``fully_shard``) each rank perturbs the rows of its own shard, with one all-reduce for the
norm. Both train to the weights of one process on whole batches; rank 0 prints what happened.

    torchrun --nproc_per_node 2 examples/distributed.py --engine ddp
    torchrun --nproc_per_node 2 examples/distributed.py --engine fsdp2
    torchrun --nproc_per_node 2 examples/distributed.py --engine ddp --no-sync   # one gradient all-reduce per step
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from common import synthetic_batches, tiny_bert_classifier

from fastadv import FGM

BATCH, STEPS = 16, 120


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--no-sync", action="store_true", help="DDP: clean pass under no_sync (FGM.step)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = tiny_bert_classifier().to(device)
    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    fgm = FGM(model, epsilon=0.1)  # on the wrapped model: it finds the embedding and the process group
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for batch in synthetic_batches(STEPS, BATCH):
        local = {key: value.chunk(world)[rank].to(device) for key, value in batch.items()}
        loss = fgm.step(lambda local=local: model(**local).loss, clean_no_sync=args.no_sync)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if rank == 0:
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        print(f"{args.engine} x {world} + FGM: {STEPS} steps, {BATCH // world} examples per rank and step")
        print(f"rank 0's mean loss over the first 10 steps {first:.3f}, over the last 10 {last:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

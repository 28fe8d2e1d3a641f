"""FGM in a plain DeepSpeed loop, ZeRO-2, two CPU processes (gloo): ``FGM(engine)`` and ``engine.backward``.

A small BERT classifier (random weights, nothing downloaded) learns the examples' synthetic task. Each
rank trains on its half of every batch; FGM's clean pass runs off the engine's accumulation boundary and
its adversarial pass on it, so the engine reduces the gradients once per step, and ``engine.step()``
follows. Under DeepSpeed fastadv perturbs the embedding lookups' outputs (ZeRO keeps the gradient).

Run it (about a minute on a CPU, the first run builds DeepSpeed's CPU communication op):

    python examples/deepspeed_loop.py
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp
from common import synthetic_batches, tiny_bert_classifier

WORLD, STEPS = 2, 40


def train(rank: int, init_file: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    import deepspeed

    from fastadv import FGM

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_bert_classifier()
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    fgm = FGM(engine, epsilon=0.3)
    losses = []
    for batch in synthetic_batches(STEPS, 16):
        mine = {key: value.chunk(WORLD)[rank] for key, value in batch.items()}
        losses.append(float(fgm.step(lambda mine=mine: engine(**mine).loss, backward=engine.backward)))
        engine.step()
    if rank == 0:
        print(f"ZeRO-2 + FGM, {WORLD} ranks: {engine.global_steps} steps; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    torch.distributed.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()

"""Training runs under DeepSpeed ZeRO in one process of a gloo group, for tests/test_deepspeed.py (spawned,
never collected).

Each rank trains the same config-built model on its half of every micro-batch, in a plain DeepSpeed loop
(``engine.backward`` for every pass, one ``engine.step()`` per micro-batch) or under ``AdversarialTrainer`` with
a DeepSpeed config; rank 0 saves the final weights, which the test compares with one process trained on whole
micro-batches (:func:`one_process`). fp32, SGD, no clipping (DeepSpeed's default clips at 1.0).

VAT, SMART and R3F: their closure returns the model's output, and their noise is a function of the ids
(``distributed_worker.noise_of_the_ids``, in every process and in the reference), so that a rank's half
micro-batch gets the noise one process gives those examples.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
from distributed_worker import noise_of_ids
from models import batches, tiny_bert

STEPS, MICRO, LR = 3, 4, 0.1  # optimizer steps; examples per micro-batch, over all ranks


def make_adversary(model: torch.nn.Module, method: str, target: str = "auto"):
    """``target``: FGM's and PGD's (under a DeepSpeed engine 'auto' perturbs the lookups' outputs)."""
    from fastadv import FGM, PGD, R3F, SMART, VAT, FreeLB, GradientPenalty

    if method == "vat":
        # xi = 1: the power iteration's gradient is q - p of two near-equal distributions; at xi = 0.3 this model's
        # ||g|| is ~1e-4 per sequence, and the ranks' reduction order alone moves the update by 1e-5.
        return VAT(model, epsilon=1.0, xi=1.0)
    if method == "smart":
        return SMART(model, epsilon=0.05, step_size=0.02, noise_var=0.01, steps=2)
    if method == "r3f":
        return R3F(model, epsilon=0.3)
    if method == "fgm":
        return FGM(model, target=target)
    if method == "pgd":
        return PGD(model, 0.05, 0.03, target=target)
    if method == "freelb":
        return FreeLB(model, adv_lr=0.05, adv_steps=2)
    if method == "gp":
        return GradientPenalty(model, 0.5, mode="exact")
    if method == "gp_fd":
        return GradientPenalty(model, 0.5)
    raise ValueError(method)


CONSISTENCY = ("vat", "smart", "r3f")


def closure_of(model: torch.nn.Module, method: str, ids: torch.Tensor, labels: torch.Tensor):
    """One forward on the micro-batch: the model's output for VAT, SMART and R3F (they compare logits), else its
    loss."""
    if method in CONSISTENCY:
        return lambda: model(input_ids=ids, labels=labels)
    return lambda: model(input_ids=ids, labels=labels).loss


def micro_batches(accumulation: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of every micro-batch, whole (MICRO examples each)."""
    return batches(STEPS * accumulation, batch=MICRO)


def one_process(method: str, accumulation: int) -> dict[str, torch.Tensor]:
    """The reference: one process, whole micro-batches, each pass's loss divided by the accumulation steps.

    In output mode, as under DeepSpeed: under accumulation its attack follows the micro-batch's own gradient,
    where weight mode's follows the accumulated one."""
    model = tiny_bert(attention="eager")
    adversary = make_adversary(model, method, target="output")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with noise_of_ids():
        for i, (ids, labels) in enumerate(micro_batches(accumulation)):
            backward = lambda loss: (loss / accumulation).backward()  # noqa: E731
            adversary.step(closure_of(model, method, ids, labels), backward=backward)
            if (i + 1) % accumulation == 0:
                opt.step()
                opt.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def config(stage: int, accumulation: int, world: int, bf16: bool = False) -> dict:
    """``bf16``: the engine holds the model in bfloat16 and the optimizer's weights in fp32."""
    return {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": MICRO // world,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},  # ZeRO-3 splits every table
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def full_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter whole (ZeRO-3 gathers its partitions), named as in the bare model."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}  # bf16 too


def plain_loop(
    rank: int, world: int, stage: int, method: str, accumulation: int, built_on: str, bf16: bool = False
) -> dict:
    """``built_on``: "engine" (``FGM(engine)``) or "bound" (``FGM(model)`` before ``deepspeed.initialize``,
    then ``bind_data_parallel(engine)``)."""
    import deepspeed

    model = tiny_bert(attention="eager")
    adversary = make_adversary(model, method) if built_on == "bound" else None
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, accumulation, world, bf16))
    if adversary is None:
        adversary = make_adversary(engine, method)
    else:
        adversary.bind_data_parallel(engine)
    for ids, labels in micro_batches(accumulation):
        ids, labels = ids.chunk(world)[rank], labels.chunk(world)[rank]
        adversary.step(closure_of(engine, method, ids, labels), backward=engine.backward)
        engine.step()
    return full_state(engine)


class Examples(torch.utils.data.Dataset):
    def __init__(self, accumulation: int) -> None:
        data = micro_batches(accumulation)
        self.ids = torch.cat([ids for ids, _ in data])
        self.labels = torch.cat([labels for _, labels in data])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer(world: int, stage: int | None, method: str, accumulation: int, bf16: bool = False) -> dict:
    """AdversarialTrainer with a DeepSpeed config (``stage``), or in one process (``stage`` None, ``world`` 1, the
    reference): accelerate's sampler gives rank r the r-th share of every micro-batch of MICRO examples.

    ``average_tokens_across_devices=False``: with it, Trainer multiplies the loss by the ranks for a model whose
    forward takes loss kwargs and ignores them (BERT's classifier), with or without fastadv."""
    from transformers import TrainingArguments

    from fastadv.integrations.hf import AdversarialTrainer

    model = tiny_bert(attention="eager")
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=MICRO // world,
            gradient_accumulation_steps=accumulation,
            max_steps=STEPS,
            optim="sgd",
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            train_sampling_strategy="sequential",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            average_tokens_across_devices=False,
            bf16=bf16,
            deepspeed=None if stage is None else config(stage, accumulation, world, bf16),
        )
        run = AdversarialTrainer(
            adversary=make_adversary(model, method, target="output"),
            model=model,
            args=args,
            train_dataset=Examples(accumulation),
        )
        with noise_of_ids():
            run.train()
        assert run.state.global_step == STEPS, f"{run.state.global_step} optimizer steps, want {STEPS}"
        if stage is None:
            return {name: p.detach().clone() for name, p in model.named_parameters()}
        engine = run.model_wrapped
        assert engine.global_steps == STEPS, f"the engine stepped {engine.global_steps} times, want {STEPS}"
        return full_state(engine)


def worker(rank: int, world: int, init_file: str, cases: dict[str, tuple], outs: dict[str, str]) -> None:
    """Every case in ``cases`` (name: (loop, stage, method, accumulation[, "bf16"])), one after the other in one process
    group; rank 0 saves each run's final weights, or the error it raised, to ``outs[name]``."""
    os.environ.update(
        DS_ACCELERATOR="cpu", FASTADV_BACKEND="torch", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.set_num_threads(1)
    # A rank that raises leaves the other waiting in a collective: the timeout ends the run instead of CI's.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        for name, (loop, stage, method, accumulation, *dtype) in cases.items():
            bf16 = dtype == ["bf16"]
            try:
                with noise_of_ids():
                    if loop == "trainer":
                        result = trainer(world, stage, method, accumulation, bf16)
                    else:
                        result = plain_loop(rank, world, stage, method, accumulation, loop.removeprefix("plain_"), bf16)
            except Exception as err:  # the test reports it; the other cases still run
                result = f"{type(err).__name__}: {err}"
            if rank == 0:
                torch.save(result, outs[name])
            dist.barrier()
    finally:
        dist.destroy_process_group()

"""DDP and FSDP2 on CPU (gloo, 2 processes): the same final weights as one process on whole batches."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.multiprocessing as mp
from conftest import relative_difference
from distributed_worker import full_state, make_adversary, schedule, train, worker, worker_cases
from models import batches, tiny_bert

WORLD = 2


def single_process_state(method: str) -> dict[str, torch.Tensor]:
    # Where the adversary was built, and no_sync (DDP only), change nothing in one process.
    for word in ("_bound", "_before", "_module", "_no_sync", "_bucketview"):
        method = method.replace(word, "")
    return _single_process_state(method)


@functools.cache
def _single_process_state(method: str) -> dict[str, torch.Tensor]:
    model = tiny_bert()
    if "_frozen" in method:
        model.get_input_embeddings().weight.requires_grad_(False)
    train(model, make_adversary(model, method), batches(3, batch=4), schedule(method))
    return full_state(model)


def assert_equals_one_process(got: dict[str, torch.Tensor], method: str, engine: str) -> None:
    want = single_process_state(method)
    assert got.keys() == want.keys()
    whole = relative_difference(
        torch.cat([got[k].flatten() for k in want]), torch.cat([v.flatten() for v in want.values()])
    )
    assert whole <= 1e-5, f"{engine}: the model's weights differ by {whole:.3g} (relative)"
    # Per parameter too, with an absolute floor: attention key biases get no gradient beyond rounding
    # noise (softmax ignores a shift), so they stay near zero and a relative measure means nothing there.
    for k in want:
        assert (got[k] - want[k]).norm() <= 1e-5 * want[k].norm() + 1e-6, f"{engine}: {k} differs"
    trained = "classifier.weight"
    assert relative_difference(got[trained], tiny_bert().classifier.weight) > 1e-4, "nothing trained"


@pytest.mark.parametrize(
    "engine,method",
    [
        ("ddp", "fgm_calls"),
        ("ddp", "fgm_step"),
        ("ddp", "fgm_step_no_sync"),
        ("ddp", "fgm_bound_step"),
        ("ddp", "pgd_calls"),
        ("ddp", "pgd_step"),
        ("ddp", "fgm_frozen_step"),
        ("ddp", "fgm_frozen_positions_step"),
        ("ddp", "pgd_frozen_calls"),
        ("fsdp2", "fgm_calls"),
        ("fsdp2", "fgm_step"),
        ("fsdp2", "pgd_calls"),
        ("fsdp2", "pgd_step"),
        ("fsdp2", "fgm_frozen_step"),
        ("fsdp2", "vat_step"),
        ("fsdp2", "smart_step"),
        ("fsdp2", "r3f_step"),
        ("fsdp2", "r3f_frozen_step"),
    ],
)
def test_data_parallel_training_equals_one_process(tmp_path, monkeypatch, engine, method):
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(WORLD, str(tmp_path / "init"), engine, method, str(out)), nprocs=WORLD, join=True)
    assert_equals_one_process(torch.load(out), method, engine)


# The adversary built before DDP wraps the model ("_before": `fgm = FGM(model); model = DDP(model)`) or on
# `ddp_model.module` ("_module"), and never told of the wrapper: it finds it in the forward pass. One spawn
# trains every case (starting the processes costs more than the training).
ORDER_CASES = [
    "fgm_before_calls",
    "fgm_before_step",
    "pgd_before_calls",
    "pgd_before_step",
    "fgm_module_calls",
    "fgm_module_step",
    "pgd_module_calls",
    "pgd_module_step",
    "fgm_frozen_before_step",  # output mode: the frozen table's lookups name the wrapper too
    "pgd_frozen_module_step",
    "fgm_before_step_no_sync",  # the wrapper known from the first step on: no_sync from the second
    # The gradient penalty is quadratic in each rank's dL/de (W times the whole batch's): epsilon / W.
    "gp_step",
    "gp_before_step",
    "freelb_step",  # normalized per sequence: no rank's scale to undo
    # .grad a view into DDP's buckets: the adversarial passes add the table's gradient rows into it
    "fgm_bucketview_step",
    "fgm_bucketview_step_no_sync",
    "pgd_bucketview_step",
    "freelb_bucketview_step",
    "r3f_bucketview_step",  # the table's zero .grad made before the step's forwards, then DDP's bucket view
    # VAT, SMART, R3F: several forwards (the inner ones under no_sync) before one backward; their noise a
    # function of the ids (tests/distributed_worker.py), so that a rank's half batch gets one process's numbers
    "vat_step",
    "smart_step",
    "smart_proximal_step",  # the momentum teacher's forward too, without gradients, through the DDP wrapper
    "r3f_step",
    "r3f_frozen_step",
]
NO_SYNC_CHECK = "warnings_after_no_sync_forward"
FSDP2_WARNINGS_CHECK = "warnings_of_fsdp2_snippet_calls"
ROW_CHECK = "row_lookups_under_ddp"


@pytest.fixture(scope="module")
def ddp_in_any_order(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("ddp_order")
    outs = {case: str(tmp / f"{case}.pt") for case in [*ORDER_CASES, NO_SYNC_CHECK, ROW_CHECK, FSDP2_WARNINGS_CHECK]}
    mp.spawn(worker_cases, args=(WORLD, str(tmp / "init"), "ddp", outs), nprocs=WORLD, join=True)
    return {case: torch.load(out) for case, out in outs.items()}


@pytest.mark.parametrize("method", ORDER_CASES)
def test_ddp_found_in_the_forward_equals_one_process(ddp_in_any_order, monkeypatch, method):
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    assert_equals_one_process(ddp_in_any_order[method], method, "ddp")


def test_fsdp2_snippet_calls_warn_of_no_unrecorded_rows(ddp_in_any_order):
    # A rank's shard of the table's gradient holds the rows every rank looked up, as FSDP2 reduces them.
    assert ddp_in_any_order[FSDP2_WARNINGS_CHECK] == [], ddp_in_any_order[FSDP2_WARNINGS_CHECK]


def test_ddp_forward_under_no_sync_names_the_wrapper(ddp_in_any_order):
    assert ddp_in_any_order[NO_SYNC_CHECK] == [], ddp_in_any_order[NO_SYNC_CHECK]


def test_ddp_adds_the_tables_gradient_as_rows_into_the_bucket_view(ddp_in_any_order):
    """3 steps with .grad kept (set_to_none=False): step 1's adversarial pass, then both passes of steps 2
    and 3 (the clean one under no_sync) add rows, into a .grad that stays DDP's bucket view."""
    assert ddp_in_any_order[ROW_CHECK] == {"row_backwards": 5, "grad_in_bucket": 3}, ddp_in_any_order[ROW_CHECK]

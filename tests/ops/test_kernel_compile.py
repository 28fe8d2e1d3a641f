"""Every Triton kernel specialisation fastadv's launchers produce compiles for sm_80 and sm_90, without spills.

CI has no GPU and runs the kernels under Triton's interpreter, which never lowers them to PTX. Here
the public launchers in ``fastadv.ops`` run with a recorder in place of the kernels module
(nothing executes), for every storage dtype, constexpr flag and row length they handle; Triton's
own JIT binder turns each recorded launch into the compile job a GPU launch would make, and each
job is compiled for real CUDA targets. So a kernel that fails to compile in bf16, or that spills
registers at d=8192, fails in CI, and a new kernel or flag is covered without editing this file.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
from kernel_specialisation import (
    Compiled,
    CompileJob,
    LaunchRecorder,
    compile_in_workers,
    installed_package_dir,
    job_ids,
    load_compiled_package,
    specialise,
    specialise_through_jit_run,
    unique_jobs,
)

import fastadv.ops.backend
from fastadv.ops import row_set_from_ids, rows_backup_add, rows_l2_norm, rows_pgd_step, rows_restore, segment_sum_by_id

ARCHS = (80, 90)  # A100, H100/H200
VOCAB = 97
ROW_LENGTHS = (60, 768, 4096, 8192)  # odd, BERT, large models (block sizes come from row_block_sizes)
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (ids in the batch, distinct ids): slot counts not divisible by 16 (45 flagged slots, 23 distinct
# rows), then divisible (64, 32), as B*T usually is: Triton's JIT specialises the two apart.
BATCHES = ((45, 23), (64, 32))


def weight_and_grad_dtypes() -> list[tuple[torch.dtype, torch.dtype]]:
    """A table's gradient is its own dtype (``.grad``), or fp32 (segment sums: PGD's inner passes)."""
    pairs = [(dtype, dtype) for dtype in STORAGE_DTYPES]
    return pairs + [(dtype, torch.float32) for dtype in STORAGE_DTYPES if dtype != torch.float32]


def drive_launchers(recorder: LaunchRecorder) -> None:
    """Call every public host launcher with the Triton backend, in every specialisation it can produce."""
    norm, ok = torch.ones(()), torch.ones((), dtype=torch.bool)
    for d in ROW_LENGTHS:
        for n_ids, n_distinct in BATCHES:
            ids = torch.arange(n_ids) % n_distinct
            row_sets = {  # first-occurrence flags (HAS_FIRST=1, static shapes) or distinct rows (HAS_FIRST=0)
                "flagged": row_set_from_ids(ids, VOCAB, static_shape=True),
                "distinct": row_set_from_ids(ids, VOCAB, static_shape=False),
            }
            for kind, row_set in row_sets.items():
                for weight_dtype, grad_dtype in weight_and_grad_dtypes():
                    weight = torch.empty(VOCAB, d, dtype=weight_dtype)
                    grad = torch.empty(VOCAB, d, dtype=grad_dtype)
                    case = f"d={d}, {len(row_set)} {kind} slots, weight {weight_dtype}, grad {grad_dtype}"
                    with recorder.labelled(f"rows_l2_norm({case})"):
                        rows_l2_norm(grad, row_set, backend="triton")
                    for sign in (False, True):
                        with recorder.labelled(f"rows_backup_add({case}, sign={sign})"):
                            backup = rows_backup_add(weight, grad, row_set, norm, ok, 0.1, sign, backend="triton")
                    with recorder.labelled(f"rows_restore({case})"):
                        rows_restore(weight, backup, row_set, backend="triton")
                    with recorder.labelled(f"rows_pgd_step({case}, first step)"):
                        backup = rows_pgd_step(weight, grad, row_set, None, norm, ok, 0.1, 0.3, backend="triton")
                    with recorder.labelled(f"rows_pgd_step({case}, later step)"):
                        rows_pgd_step(weight, grad, row_set, backup, norm, ok, 0.1, 0.3, backend="triton")
            for values_dtype in STORAGE_DTYPES:  # dL/de rows in the model's dtype, summed into fp32
                values = torch.empty(n_ids, d, dtype=values_dtype)
                with recorder.labelled(f"segment_sum_by_id(d={d}, {n_ids} ids, values {values_dtype})"):
                    segment_sum_by_id(values, ids, num_rows=VOCAB, static_shape=True, backend="triton")


# Collected at import, so each specialisation is its own test; nothing runs on a device.
KERNELS = load_compiled_package(installed_package_dir("fastadv_kernels"), "_fastadv_kernels_compiled")
RECORDER = LaunchRecorder(KERNELS.__all__)
with pytest.MonkeyPatch.context() as patch:
    patch.setattr(fastadv.ops.backend, "_kernels", RECORDER)
    drive_launchers(RECORDER)
JOBS = unique_jobs(KERNELS, RECORDER.launches, ARCHS)


def test_every_kernel_is_launched() -> None:
    """A kernel the launchers never call would go uncompiled here: the capture must see them all."""
    missing = sorted(set(KERNELS.__all__) - {launch.kernel for launch in RECORDER.launches})
    assert not missing, f"drive_launchers() launched no {missing}: add the launcher calls that use them"


def test_every_constexpr_flag_is_launched_both_ways() -> None:
    """Each boolean constexpr (SIGN, HAS_FIRST, SAVE_BACKUP, ...) compiles two kernels: both must be built."""
    seen: dict[tuple[str, str], set[bool]] = defaultdict(set)
    for launch in RECORDER.launches:
        params = getattr(KERNELS, launch.kernel).params
        names = [p.name for p in params][: len(launch.args)]
        values = dict(zip(names, launch.args, strict=True)) | launch.kwargs
        for param in params:
            if param.is_constexpr and isinstance(values.get(param.name), bool):
                seen[launch.kernel, param.name].add(values[param.name])
    one_way = {f"{kernel}.{name}": values for (kernel, name), values in seen.items() if len(values) < 2}
    assert seen and not one_way, f"constexpr flags launched one way only: {one_way}"


def test_specialisation_is_the_one_jit_run_makes() -> None:
    """Each job must be what ``JITFunction.run`` itself would compile for that launch on that GPU.

    Guards :func:`specialise` (Triton's binder and ``_pack_args``, called directly) against a Triton
    release whose ``run`` adds or changes a step.
    """
    options = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid", "extern_libs")
    differences = []
    for launch in RECORDER.launches:
        for arch in ARCHS:
            job, request = specialise(KERNELS, launch, arch), specialise_through_jit_run(KERNELS, launch, arch)
            ours = (job.signature, job.constexprs, job.attrs, *(job.options[name] for name in options))
            theirs = (request["signature"], request["constants"], request["configs"][0])
            theirs += tuple(request[name] for name in options)
            if ours != theirs:
                differences.append(f"{launch.kernel} sm_{arch} ({launch.origin}):\n  ours {ours}\n  run  {theirs}")
    summary = "\n".join(differences[:5])
    assert not differences, f"{len(differences)} launches specialise unlike JITFunction.run:\n{summary}"


@pytest.fixture(scope="session")
def compiled(request: pytest.FixtureRequest) -> dict[str, Compiled]:
    """The selected tests' jobs, compiled at once, one worker process per CPU core (CI has 2)."""
    selected = [item.callspec.params["job"] for item in request.session.items if "job" in _params(item)]
    return compile_in_workers(selected, workers=max(1, min(len(os.sched_getaffinity(0)), 8)))


def _params(item: pytest.Item) -> dict:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


@pytest.mark.parametrize("job", JOBS, ids=job_ids(JOBS))
def test_kernel_compiles_without_spills(job: CompileJob, compiled: dict[str, Compiled]) -> None:
    """The cubin is built, and ptxas kept the kernel in registers (no stack frame, no local memory)."""
    result = compiled[job.key]
    origins = "; ".join(job.origins[:3]) + (f"; and {len(job.origins) - 3} more" if len(job.origins) > 3 else "")
    if result.error:
        pytest.fail(f"{job.describe()} does not compile.\nLaunched by: {origins}\n{result.error}", pytrace=False)
    assert result.cubin, f"{job.describe()}: triton.compile returned an empty cubin"
    if result.usage.get("STACK", 0) or result.usage.get("LOCAL", 0):
        pytest.fail(
            f"{job.describe()} spills registers to local memory: cuobjdump reports {result.usage_line}; the SASS "
            f"holds {result.local_instructions.get('STL')} local stores (STL) and "
            f"{result.local_instructions.get('LDL')} local loads (LDL).\nLaunched by: {origins}",
            pytrace=False,
        )

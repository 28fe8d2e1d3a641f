"""Compile Triton kernels for real CUDA targets without a GPU, from launches captured on the host.

CI has no GPU: the kernel tests run under Triton's interpreter, which never lowers a kernel to PTX,
so a kernel that fails to compile, or that spills registers, for bf16 or at d=8192 would only show
on a GPU machine. This module closes that gap in three steps:

1. :class:`LaunchRecorder` stands in for the kernels module and records every ``kernel[grid](...)``
   the host launchers make, so the launch arguments are the launchers' own, never retyped;
2. :func:`specialise` feeds a recorded launch to Triton's own JIT binder, the code a real launch
   runs to pick the signature (pointer dtypes, ``i32``/``i64``, an int equal to 1 as a constexpr,
   16-divisibility attributes), so the compile job is the one a GPU launch would compile;
3. :func:`compile_in_workers` compiles the jobs with ``triton.compile`` for a ``GPUTarget``, in
   fresh processes, and reads each cubin's registers, stack and local memory with the
   ``cuobjdump`` Triton ships.

:func:`specialise_through_jit_run` cross-checks step 2 against ``JITFunction.run`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

WARP_SIZE = 32


# ---------------------------------------------------------------- capture


@dataclass(frozen=True)
class TensorArg:
    """What Triton's JIT reads from a tensor argument: its dtype and the alignment of its address.

    Kept instead of the tensor so a capture holds no memory; Triton's specialisation reads only
    ``dtype`` and ``data_ptr()``, so it treats this exactly as the tensor it was made from.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    address: int

    def data_ptr(self) -> int:
        return self.address

    def __repr__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


@dataclass(frozen=True)
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``, tensors replaced by :class:`TensorArg`."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    origin: str  # which launcher call made it, for failure messages


class _RecordingKernel:
    """``kernel[grid](*args, **kwargs)`` records the launch and runs nothing."""

    def __init__(self, recorder: LaunchRecorder, name: str) -> None:
        self._recorder, self._name = recorder, name

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self._recorder.record(self._name, grid, args, kwargs)

        return launch


class LaunchRecorder:
    """Stands in for a kernels module: each kernel attribute records its launches instead of running.

    Only names the real module has are answered, so a launcher calling a kernel that does not exist
    fails here as it would on a GPU.
    """

    def __init__(self, kernel_names: Sequence[str]) -> None:
        self._kernel_names = frozenset(kernel_names)
        self.launches: list[Launch] = []
        self.origin = ""

    def __getattr__(self, name: str) -> _RecordingKernel:
        if name.startswith("_") or name not in self._kernel_names:
            raise AttributeError(f"the kernels module has no kernel {name!r}")
        return _RecordingKernel(self, name)

    def record(self, name: str, grid: tuple[int, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        def light(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return TensorArg(value.dtype, tuple(value.shape), value.data_ptr())
            return value

        args = tuple(light(a) for a in args)
        kwargs = {k: light(v) for k, v in kwargs.items()}
        self.launches.append(Launch(name, tuple(grid), args, kwargs, self.origin))

    @contextlib.contextmanager
    def labelled(self, origin: str) -> Iterator[None]:
        """Launches made inside the block are labelled ``origin`` (named in failure messages)."""
        previous, self.origin = self.origin, origin
        try:
            yield
        finally:
            self.origin = previous


# ---------------------------------------------------------------- compiled (not interpreted) kernels


@contextlib.contextmanager
def compiled_mode() -> Iterator[None]:
    """Triton's interpreter switched off inside the block, whatever TRITON_INTERPRET says.

    ``triton.jit`` picks interpreted or compiled at decoration from ``knobs.runtime.interpret``
    (Triton 3.6 and 3.9 alike), and ``constexpr_function`` reads it while compiling. The knob
    returns to its previous value (the environment variable) on exit, so the interpreted tests
    around are untouched. Decorating in this block is enough to specialise launches; compiling
    needs more (see :func:`compile_in_workers`).
    """
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        yield


def installed_package_dir(package: str) -> Path:
    """The directory a package would be imported from, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot find the package {package!r}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_compiled_package(package_dir: Path, private_name: str) -> ModuleType:
    """Import every module of ``package_dir`` (fastadv's kernels/) afresh in a package named ``private_name``,
    their kernels compiled JITFunctions: a module holding every ``*_kernel`` of them, listed in ``__all__``.

    The kernels as fastadv imports them may already be decorated for the interpreter (the test session
    sets TRITON_INTERPRET=1), and cannot be decorated twice under one name; a private copy can.
    """
    package = ModuleType(private_name)
    package.__path__ = [str(package_dir)]  # a namespace-like package: the modules' relative imports resolve there
    sys.modules[private_name] = package
    try:
        with compiled_mode():
            for name in sorted(path.stem for path in package_dir.glob("*.py")):
                module = importlib.import_module(f"{private_name}.{name}")
                for key, value in vars(module).items():
                    if key.endswith("_kernel"):
                        setattr(package, key, value)
    finally:
        for name in [n for n in sys.modules if n == private_name or n.startswith(private_name + ".")]:
            del sys.modules[name]
    package.__all__ = sorted(key for key in vars(package) if key.endswith("_kernel"))
    return package


# ---------------------------------------------------------------- specialisation


@dataclass
class CompileJob:
    """One kernel specialisation for one target, as Triton's JIT would compile it.

    ``signature`` (parameter name -> type), ``constexprs`` and ``attrs`` (keyed by argument path)
    are exactly what ``JITFunction.run`` hands ``ASTSource``; ``options`` what it hands ``compile``.
    """

    kernel: str
    package_dir: str  # where the kernels module is loaded from (a compile worker loads it afresh)
    param_names: tuple[str, ...]
    arch: int
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    origins: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Identical for jobs that compile to the same cubin (d=768, 4096 and 8192 often share one)."""
        return repr((self.kernel, self.arch, self.signature, self.constexprs, self.attrs, sorted(self.options.items())))

    def describe(self) -> str:
        """The specialisation in words: every parameter's type or constexpr value, and the target."""
        parts = []
        for i, name in enumerate(self.param_names):
            if (i,) in self.constexprs:
                parts.append(f"{name}={self.constexprs[(i,)]!r}")
            else:
                div = " (16-divisible)" if _divisible_by_16(self.attrs.get((i,))) else ""
                parts.append(f"{name}: {self.signature[name]}{div}")
        return f"{self.kernel}({', '.join(parts)}) for sm_{self.arch}"


def _divisible_by_16(attr: Any) -> bool:
    """Whether a parsed attribute (Triton 3.6 and 3.9: ``[['tt.divisibility', 16]]``) marks 16-divisibility."""
    return bool(attr) and ["tt.divisibility", 16] in [list(a) for a in attr]


@functools.cache
def triton_binder(fn: Any, arch: int) -> tuple[Any, Callable[..., Any]]:
    """(backend, binder) as ``JITFunction.create_binder`` makes them for a CUDA ``arch``, without a device.

    The binder is the function a real launch calls to specialise its arguments; it is Triton's own
    (``create_function_from_signature``, present in Triton 3.6 and 3.9), so the signature here cannot
    drift from what a GPU launch would compile.
    """
    if "nvidia" not in triton.backends.backends:
        raise RuntimeError(
            "Triton's nvidia backend is missing (it ships in the Linux wheels of triton): "
            "the kernels cannot be compiled for CUDA targets here."
        )
    from triton.compiler import make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as error:
        raise RuntimeError(
            f"Triton {triton.__version__} no longer has triton.runtime.jit.create_function_from_signature, "
            "which tests/ops/kernel_specialisation.py calls to specialise launches as the JIT does: port it."
        ) from error
    backend = make_backend(GPUTarget("cuda", arch, WARP_SIZE))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialise(module: ModuleType, launch: Launch, arch: int) -> CompileJob:
    """The compile job Triton's JIT makes for ``launch`` on a CUDA GPU of compute capability ``arch``.

    Mirrors ``JITFunction.run``: the ``debug`` option defaults as there, then the binder specialises
    the arguments and ``JITFunction._pack_args`` turns that into signature, constexprs, attributes
    and options (both methods are Triton's, called as ``run`` calls them).
    """
    fn = getattr(module, launch.kernel)
    backend, binder = triton_binder(fn, arch)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return CompileJob(
        kernel=launch.kernel,
        package_dir=module.__path__[0],
        param_names=tuple(p.name for p in fn.params),
        arch=arch,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=dict(options.__dict__),
        origins=[launch.origin],
    )


class _StubDriver:
    """Just enough of a Triton driver for ``JITFunction.run`` to specialise a launch for ``arch``."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return self.arch  # one binder cache per arch

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, WARP_SIZE)


def specialise_through_jit_run(module: ModuleType, launch: Launch, arch: int) -> dict[str, Any]:
    """What ``JITFunction.run`` itself would compile for ``launch``: a cross-check of :func:`specialise`.

    ``run`` is called for real, with a stub driver for the target and a ``jit_cache_hook`` that
    reads the compile request and stops ``run`` before it compiles or launches (the hook's documented
    use). Needs no GPU; the driver and the knob are put back afterwards.
    """
    from triton.runtime.driver import driver

    requests: list[dict[str, Any]] = []

    def stop_before_compiling(*, compile: dict[str, Any], **_: Any) -> bool:
        requests.append(compile)
        return True

    previous = driver._active  # no default driver exists without a GPU, so reset_active() cannot restore it
    driver.set_active(_StubDriver(arch))
    try:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.jit_cache_hook = stop_before_compiling
            getattr(module, launch.kernel)[launch.grid](*launch.args, **launch.kwargs)
    finally:
        driver._active = previous
    (request,) = requests
    return request


def unique_jobs(module: ModuleType, launches: Sequence[Launch], archs: Sequence[int]) -> list[CompileJob]:
    """Every launch specialised for every arch, identical jobs merged (their origins kept)."""
    jobs: dict[str, CompileJob] = {}
    for launch in launches:
        for arch in archs:
            job = specialise(module, launch, arch)
            if job.key in jobs:
                if launch.origin not in jobs[job.key].origins:
                    jobs[job.key].origins.append(launch.origin)
            else:
                jobs[job.key] = job
    return list(jobs.values())


def job_ids(jobs: Sequence[CompileJob]) -> list[str]:
    """Test ids that read as the specialisation, e.g. ``rows_backup_add_kernel-w_bf16-g_fp32-SIGN1-...-sm90``.

    Per kernel, a parameter is named only when it differs between that kernel's jobs, and not when
    it follows a parameter already named (``backup`` has ``w``'s dtype, BLOCK_N follows BLOCK_D).
    Constexprs are considered first, the block sizes first of all, so they are the ones named.
    """
    tokens = {id(job): _param_tokens(job) for job in jobs}
    ids: dict[int, str] = {}
    for kernel in dict.fromkeys(job.kernel for job in jobs):
        mine = [job for job in jobs if job.kernel == kernel]
        names = list(mine[0].param_names)
        constexprs = [name for i, name in enumerate(names) if (i,) in mine[0].constexprs]
        columns = {name: [tokens[id(job)][name] for job in mine] for name in names}
        shown: list[str] = []
        for name in [*reversed(constexprs), *[n for n in names if n not in constexprs]]:
            column = columns[name]
            if len(set(column)) > 1 and not any(_follows(column, columns[other]) for other in shown):
                shown.append(name)
        shown.sort(key=names.index)
        for job in mine:
            ids[id(job)] = "-".join([kernel, *(tokens[id(job)][name] for name in shown), f"sm{job.arch}"])
    result = [ids[id(job)] for job in jobs]
    duplicates = sorted({i for i in result if result.count(i) > 1})
    assert not duplicates, f"two compile jobs read the same: {duplicates}"
    return result


def _follows(column: list[str], other: list[str]) -> bool:
    """Whether ``column``'s value is a function of ``other``'s across the jobs (naming it adds nothing)."""
    mapping: dict[str, str] = {}
    return all(mapping.setdefault(o, c) == c for c, o in zip(column, other, strict=True))


def _param_tokens(job: CompileJob) -> dict[str, str]:
    """Each parameter as it reads in an id: ``SIGN1``, ``BLOCK_D256``, ``w_bf16``, ``D``, ``N_div16``."""
    tokens = {}
    for i, name in enumerate(job.param_names):
        if (i,) in job.constexprs:
            value = job.constexprs[(i,)]
            tokens[name] = f"{name}{int(value) if isinstance(value, bool) else value}"
            continue
        ty, div = job.signature[name], _divisible_by_16(job.attrs.get((i,)))
        if ty.startswith("*"):
            tokens[name] = f"{name.removesuffix('_ptr')}_{ty[1:]}" + ("" if div else "_unaligned")
        else:
            tokens[name] = name + ("" if ty == "i32" else f"_{ty}") + ("_div16" if div else "")
    return tokens


# ---------------------------------------------------------------- compile and measure


@dataclass(frozen=True)
class Compiled:
    """What compiling a job gave: the cubin and its resources, or the compiler's error."""

    cubin: bytes = b""
    usage: dict[str, int] = field(default_factory=dict)  # cuobjdump's REG, STACK, SHARED, LOCAL, ...
    usage_line: str = ""
    local_instructions: dict[str, int] = field(default_factory=dict)  # STL/LDL counts, read when STACK/LOCAL > 0
    error: str = ""


def compile_in_workers(jobs: Sequence[CompileJob], workers: int) -> dict[str, Compiled]:
    """Compile ``jobs`` in ``workers`` fresh Python processes; results by job key.

    Not in this process: where TRITON_INTERPRET=1 was set when ``triton.language`` was imported (as
    the test session sets it), Triton's own library functions (``tl.sum``'s combine function, ...)
    are interpreted functions, and calling one while compiling patches the language for the
    interpreter, so no kernel compiles. A process started without the variable is clean. Jobs and
    results travel through files: Triton prints to stdout when ptxas fails.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__)
    command = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as m; m._worker()"
    results: dict[str, Compiled] = {}
    with tempfile.TemporaryDirectory(prefix="fastadv-compile-") as tmp:
        running = []
        for i in range(workers):
            chunk, paths = jobs[i::workers], [Path(tmp, f"{i}.{kind}") for kind in ("jobs", "results", "log")]
            if not chunk:
                continue
            paths[0].write_bytes(pickle.dumps(list(chunk)))
            with paths[2].open("wb") as log:
                args = [sys.executable, "-c", command, str(paths[0]), str(paths[1])]
                running.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), paths))
        for process, (_, results_path, log_path) in running:
            if process.wait() != 0:
                log = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"a compile worker failed (exit code {process.returncode}):\n{log}")
            results.update({key: Compiled(**fields) for key, fields in pickle.loads(results_path.read_bytes()).items()})
    return results


def compile_job(job: CompileJob, kernels: ModuleType) -> Compiled:
    """Compile ``job`` as ``JITFunction._do_compile`` does (``ASTSource``, then ``triton.compile``).

    Needs a process whose ``triton.language`` is not interpreted (see :func:`compile_in_workers`).
    """
    from triton.compiler import ASTSource

    try:
        with compiled_mode():
            source = ASTSource(getattr(kernels, job.kernel), job.signature, job.constexprs, job.attrs)
            kernel = triton.compile(source, target=GPUTarget("cuda", job.arch, WARP_SIZE), options=job.options)
    except Exception as error:  # a compile error is a test result, reported with the specialisation
        return Compiled(error=f"{type(error).__name__}: {error}")
    cubin = kernel.asm["cubin"]
    usage_line = _cuobjdump(cubin, "--dump-resource-usage")
    usage = _parse_usage(usage_line, job.kernel)
    local = local_memory_instructions(cubin) if usage.get("STACK") or usage.get("LOCAL") else {}
    return Compiled(cubin, usage, _usage_line(usage_line, job.kernel), local)


def local_memory_instructions(cubin: bytes) -> dict[str, int]:
    """How many local-memory stores (STL) and loads (LDL) the SASS holds: ptxas' spill code."""
    sass = _cuobjdump(cubin, "-sass")
    return {op: len(re.findall(rf"\b{op}(\.\w+)*\s", sass)) for op in ("STL", "LDL")}


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = triton.knobs.nvidia.cuobjdump.path  # the one Triton ships (or TRITON_CUOBJDUMP_PATH)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], check=True, capture_output=True, text=True).stdout


def _usage_line(report: str, kernel: str) -> str:
    """The ``REG:44 STACK:0 SHARED:0 LOCAL:0 ...`` line under ``Function <kernel>:``."""
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n(.*)", report)
    if match is None:
        raise AssertionError(f"cuobjdump reports no function {kernel!r}:\n{report}")
    return match.group(1).strip()


def _parse_usage(report: str, kernel: str) -> dict[str, int]:
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", _usage_line(report, kernel))}


def _worker() -> None:
    """Compile worker: ``argv[1]`` holds the pickled jobs; ``argv[2]`` receives ``{job key: Compiled fields}``."""
    jobs: list[CompileJob] = pickle.loads(Path(sys.argv[1]).read_bytes())
    packages: dict[str, ModuleType] = {}
    results = {}
    for job in jobs:
        if job.package_dir not in packages:
            private_name = f"_compile_worker_kernels_{len(packages)}"
            packages[job.package_dir] = load_compiled_package(Path(job.package_dir), private_name)
        results[job.key] = dataclasses.asdict(compile_job(job, packages[job.package_dir]))
    Path(sys.argv[2]).write_bytes(pickle.dumps(results))

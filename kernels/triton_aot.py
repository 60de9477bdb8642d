"""Compile every Triton kernel of the knowledge path ahead of time, for GPUs this machine does not have.

Shapes: T tokens, K slots per token, E experts, D model dim, F expert width (the production shape
below unless overridden).

Triton compiles for a ``GPUTarget`` without a driver: its frontend, LLVM and the bundled ``ptxas`` all
run on the CPU. What gets compiled is what a GPU run would launch: the real launchers
(``kernels.expert_mlp.triton_mlp.knowledge_mlp_fwd`` / ``_bwd``, the standalone ops' launchers, the routing) run
on meta tensors with ``launch`` replaced by a recorder, so every kernel, constexpr variant and argument
(dtypes, ints, pointer alignment of windows) comes from the code itself; each recorded launch expands
to the configs its autotuner would try for that dot precision (a deterministic launch: its pinned
config only). Each is specialised exactly as Triton's JIT would (its own binder: 16-divisible ints
and 16-aligned pointers as hints) and compiled with ``ptxas -v``, whose report gives registers and
spills.

A kernel fails the check if it does not compile, if ptxas spills registers to local memory, or, where
it cannot be skipped (a deterministic run's pinned config, an untuned kernel), if its shared memory
exceeds the architecture's. An autotuned candidate too big for one architecture only is reported: the
autotuner skips it there (Triton's ``OutOfResources``).

    python -m pure_reasoner.kernels.triton_aot                       # sm_90 and sm_80, fp32 (IEEE, TF32), fp16, bf16
    python -m pure_reasoner.kernels.triton_aot --arch 90 --json out.json --jobs 2

Run it without ``TRITON_INTERPRET`` (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from unittest import mock

import torch

from pure_reasoner.kernels.backends import interpreting

PRECISIONS = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")
_DTYPES = {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest dynamic shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class Shape:
    """The workload whose launches are recorded: production by default (T=2048, K=8, E=64, D=4096,
    F=14336), with the saved-row bound of the default consult rate (1.5 x 1/8 of T*K, + 64)."""

    num_tokens: int = 2048
    top_k: int = 8
    num_experts: int = 64
    dim: int = 4096
    width: int = 14336
    max_rows: int = 3136


@dataclass(frozen=True)
class Job:
    """One kernel binary: a recorded launch under one config, for one architecture."""

    kernel: str
    variant: str
    config: str
    precision: str
    arch: int
    skippable: bool  # an autotune candidate (the autotuner drops it where it does not fit)
    first: bool  # the launch's first candidate: the pinned config of deterministic runs
    launch_index: int
    config_index: int


@dataclass
class Result:
    job: Job
    ok: bool
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    ptx: str = ""  # kept on request only (``run(keep_ptx=True)``)

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT[self.job.arch]

    @property
    def failed(self) -> bool:
        return not self.ok or self.spill_bytes > 0 or (not self.fits and not self.job.skippable)


@dataclass(frozen=True)
class _Launch:
    kernel: object
    args: tuple
    constexprs: dict
    deterministic: bool
    precision: str


def _record_launches(shape: Shape, precision: str) -> list[_Launch]:
    """Every kernel launch of a training step's fwd+bwd (normal and deterministic), plus the standalone
    ops' launches, as the launchers make them, on meta tensors (the routing with ``PRECISIONS[0]`` only)."""
    from pure_reasoner.kernels.expert_mlp import triton_down, triton_mlp, triton_up, triton_wgrad
    from pure_reasoner.kernels.routing import triton_routing

    launches: list[_Launch] = []

    def record(kernel, grid, *args, deterministic, **constexprs):
        launches.append(_Launch(kernel, args, constexprs, deterministic, precision))

    dtype, tf32 = _DTYPES[precision], precision == "fp32-tf32"
    t, k, e, d, f = shape.num_tokens, shape.top_k, shape.num_experts, shape.dim, shape.width
    s = t * k

    def meta(*size, dtype=dtype):
        return torch.empty(*size, dtype=dtype, device="meta")

    x, gates, dy = meta(t, d), meta(t, k, dtype=torch.float32), meta(t, d)
    w1, w3, w2 = meta(e, d, f), meta(e, d, f), meta(e, f, d)
    slot_order, offsets = meta(s, dtype=torch.int64), meta(e, dtype=torch.int32)
    saved = min(shape.max_rows, s)
    with contextlib.ExitStack() as stack:
        for module in (triton_up, triton_down, triton_wgrad, triton_routing):
            stack.enter_context(mock.patch.object(module, "launch", record))
        for module in (triton_up, triton_down, triton_routing):
            stack.enter_context(mock.patch.object(module, "check_triton", lambda *tensors: None))
        for deterministic in (False, True):
            _, a1, a3 = triton_mlp.knowledge_mlp_fwd(x, slot_order, offsets, gates, w1, w3, w2, shape.max_rows,
                                                     True, deterministic, tf32)
            triton_mlp.knowledge_mlp_bwd(dy, x, slot_order, offsets, gates, w1, w3, w2, a1, a3, deterministic, tf32)
        h, rows = meta(s, f), meta(s, f)
        triton_down.down_scatter_bwd(dy, h, gates, slot_order, offsets, w2, tf32=tf32)
        triton_up.swiglu_grads_rows(rows, rows, rows)
        if precision == PRECISIONS[0]:  # the routing is dtype-free: once, with and without its id check
            for debug in (False, True):  # the launcher itself: its custom op would run the fake on meta
                triton_routing._routing_metadata_launch(meta(t, k, dtype=torch.int64), e, debug)
    assert saved < s, "the production shape exercises the recompute window too"
    return launches


def _configs(launch: _Launch) -> list[tuple[dict, bool]]:
    """(launch options + constexprs, skippable) for every binary this launch can run."""
    import triton

    from pure_reasoner.kernels.triton_schedule import pinned_config

    kernel = launch.kernel
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [({"num_warps": 4, **launch.constexprs}, False)]
    if launch.deterministic:
        return [({**launch.constexprs, **pinned_config(kernel, launch.constexprs).all_kwargs()}, False)]
    candidates = kernel.early_config_prune(kernel.configs, {}, **launch.constexprs)
    return [({**launch.constexprs, **c.all_kwargs()}, len(candidates) > 1) for c in candidates]


def _kernel_fn(kernel):
    """The JITFunction under an autotuner."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _describe(fn, kwargs: dict) -> tuple[str, str]:
    tiles = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "GROUP", "num_"))}
    variant = {k: v for k, v in kwargs.items() if k not in tiles and k in fn.arg_names}
    if kwargs.get("debug"):
        variant["debug"] = True
    return ",".join(f"{k}={v}" for k, v in sorted(variant.items())), ",".join(f"{k}={v}" for k, v in tiles.items())


@functools.lru_cache(maxsize=1)
def _plan(shape: Shape, precisions: tuple[str, ...], archs: tuple[int, ...], kernels: frozenset[str] | None,
          first_only: bool):
    """(launches, jobs): unique (kernel, specialisation, config, arch) binaries, in a fixed order;
    ``kernels``: only these; ``first_only``: each launch's first candidate only."""
    launches = [launch for p in precisions for launch in _record_launches(shape, p)]
    jobs, seen = [], set()
    for li, launch in enumerate(launches):
        fn = _kernel_fn(launch.kernel)
        if kernels is not None and fn.__name__ not in kernels:
            continue
        for ci, (kwargs, skippable) in enumerate(_configs(launch)):
            if first_only and ci > 0:
                continue
            variant, config = _describe(fn, kwargs)
            dtypes = ",".join(str(a.dtype) for a in launch.args if isinstance(a, torch.Tensor))
            aligned = "".join(str(int(a.data_ptr() % 16 == 0)) for a in launch.args if isinstance(a, torch.Tensor))
            for arch in archs:
                key = (fn.__name__, variant, config, dtypes, aligned, arch)
                if key not in seen:
                    seen.add(key)
                    jobs.append(Job(fn.__name__, variant, config, launch.precision, arch, skippable, ci == 0, li, ci))
    return launches, jobs


def _compile(plan_args: tuple, keep_ptx: bool, index: int) -> Result:
    """Compile job ``index`` of ``_plan(*plan_args)`` as Triton's JIT would, and read ptxas's report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    launches, jobs = _plan(*plan_args)
    job = jobs[index]
    launch = launches[job.launch_index]
    fn = _kernel_fn(launch.kernel)
    kwargs, _ = _configs(launch)[job.config_index]
    kwargs = {"debug": fn.debug or knobs.runtime.debug, **kwargs}
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # a compile error is the finding: report it, do not stop the sweep
        return Result(job, ok=False, seconds=time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"[:2000])
    report = log.getvalue()
    spills = _SPILLS.search(report)
    registers = _REGISTERS.search(report)
    if spills is None or registers is None:
        return Result(job, ok=False, error=f"no ptxas report in the compile log: {report[-500:]!r}")
    return Result(job, ok=True, registers=int(registers.group(1)),
                  spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                  shared_bytes=compiled.metadata.shared, seconds=time.perf_counter() - start,
                  ptx=compiled.asm["ptx"] if keep_ptx else "")


def run(shape: Shape, precisions: tuple[str, ...], archs: tuple[int, ...], jobs: int,
        kernels: frozenset[str] | None = None, first_only: bool = False, keep_ptx: bool = False) -> list[Result]:
    """Compile the plan on ``jobs`` processes; results in plan order.

    Args:
        shape: the recorded workload; precisions: of ``PRECISIONS``; archs: compute capabilities (90, 80).
        kernels: kernel function names to compile (None: all); first_only: each launch's first candidate.
        keep_ptx: return each binary's PTX too.
    """
    if interpreting():
        raise ValueError("kernels.triton_aot compiles kernels: unset TRITON_INTERPRET (it is 1)")
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    for a in archs:
        if a not in SHARED_LIMIT:
            raise ValueError(f"arch must be one of {sorted(SHARED_LIMIT)}, got {a}")
    plan_args = (shape, precisions, archs, kernels, first_only)
    _, plan = _plan(*plan_args)
    work = functools.partial(_compile, plan_args, keep_ptx)
    if jobs <= 1:
        return [work(i) for i in range(len(plan))]
    # fork: the children inherit the imported kernels; nothing here has touched CUDA.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(work, range(len(plan)), chunksize=1)


def _table(results: list[Result]) -> str:
    lines = [f"{'kernel':28} {'prec':9} {'sm':>3} {'regs':>4} {'spill':>5} {'smem KiB':>8} {'s':>5}  config / variant"]
    for r in results:
        j = r.job
        status = "" if r.ok else f"  COMPILE ERROR {r.error[:200]}"
        smem = f"{r.shared_bytes / 1024:.0f}" + ("" if r.fits else ("!" if not j.skippable else "~"))
        lines.append(f"{j.kernel:28} {j.precision:9} {j.arch:>3} {r.registers:>4} {r.spill_bytes:>5} {smem:>8} "
                     f"{r.seconds:5.1f}  {j.config} | {j.variant}{status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90, 80)")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--jobs", type=int, default=max(1, multiprocessing.cpu_count()))
    parser.add_argument("--configs", choices=["all", "first"], default="all",
                        help="every autotune candidate, or each launch's first (the deterministic pin)")
    parser.add_argument("--kernel", nargs="+", help="compile only these kernels (function names)")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--ptx-dir", help="write each binary's PTX here, named as in the JSON's 'ptx_file'")
    for field in dataclasses.fields(Shape):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    args = parser.parse_args(argv)
    shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
    start = time.perf_counter()
    results = run(shape, tuple(args.precision), tuple(args.arch), args.jobs,
                  kernels=frozenset(args.kernel) if args.kernel else None, first_only=args.configs == "first",
                  keep_ptx=bool(args.ptx_dir))
    ptx_files = [f"{i:03d}-{r.job.kernel}-{r.job.precision}-sm{r.job.arch}.ptx" for i, r in enumerate(results)]
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
        for name, r in zip(ptx_files, results, strict=True):
            with open(os.path.join(args.ptx_dir, name), "w") as fh:
                fh.write(r.ptx)
    print(_table(results))
    failed = [r for r in results if r.failed]
    too_big = sum(1 for r in results if not r.fits and r.job.skippable)
    print(f"{len(results)} binaries compiled in {time.perf_counter() - start:.0f} s ({args.jobs} processes); "
          f"{len(failed)} failed (compile error, spill, or a pinned config over shared memory); "
          f"{too_big} autotune candidates over one arch's shared memory (skipped there by the autotuner, '~')")
    if args.json:
        with open(args.json, "w") as fh:
            rows = [{**dataclasses.asdict(r.job), "failed": r.failed, "ptx_file": name if args.ptx_dir else None,
                     **{k: v for k, v in dataclasses.asdict(r).items() if k not in ("job", "ptx")}}
                    for name, r in zip(ptx_files, results, strict=True)]
            json.dump({"shape": dataclasses.asdict(shape), "results": rows}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

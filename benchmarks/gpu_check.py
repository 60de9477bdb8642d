"""The GPU check: everything the Triton knowledge path must show on a CUDA machine, in one run.

    bash benchmarks/gpu_check.sh [OUT_DIR]          # installs the GPU extras, then runs this
    python -m pure_reasoner.benchmarks.gpu_check --out DIR [--only step,...] [--dry-run]

Shapes: T tokens, K slots per token, E experts, D model dim, F expert width. Steps (each with a time
budget; the plan fits 8 minutes on one H100-class GPU, all steps sharing one Triton cache):

- ``kernel_tests``: tests/kernels' Triton suites (fp32, fp16, bf16 on CUDA, ``opcheck`` included) with
  pinned launch configs (one compile per kernel and shape, ``PURE_REASONER_TRITON_PIN_CONFIGS``);
- ``sanitizer``: compute-sanitizer memcheck and initcheck on one small fwd+bwd with empty experts;
- ``production``: bf16 T=2048, K=8, E=64, D=4096, F=14336 against the torch path in fp32 (experts in
  groups of 8: the output and gradients are sums over experts), at consult rate 1/8;
- ``overflow``: S x F above 2^31 (T=20000, K=8, D=256, F=14336): the tokens whose rows sit last in
  the sorted order against the float64 loop oracle;
- ``sync_free``: forward and backward under ``torch.cuda.set_sync_debug_mode("error")``;
- ``cuda_graph``: one capture of fwd+bwd, replayed on new inputs, against eager;
- ``inductor``: ``torch.compile(fullgraph=True)`` (Inductor) against eager, output and gradients;
- ``determinism``: run-to-run bitwise difference of y, dx, dgates, with and without ``deterministic``;
- ``device_guard``: tensors on cuda:1 while cuda:0 is current (needs 2 GPUs);
- ``perf``: per-kernel TFLOP/s of our Triton kernels (profiler) and fwd/bwd TFLOP/s of every provider
  that installs (ours, torch grouped_mm, megablocks, sonic-moe) at the production shape, rates 1/8 and 1,
  against the GPU's bf16 dense peak.

Each step records pass / fail / skipped (with the reason) and its figures in ``gpu_check.json``. On a
machine without CUDA, ``--allow-cpu`` runs the steps that can run under ``TRITON_INTERPRET=1`` on tiny
fp32 shapes (a smoke test of this script: production, overflow without the overflow, Inductor's graph
capture with the aot_eager backend, determinism, perf with the torch provider) and skips the CUDA-only
ones, saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment, for the perf step's share.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0}


@dataclass(frozen=True)
class Shape:
    """One knowledge-path workload (T, K, E, D, F) and its consult rate."""

    tokens: int
    top_k: int
    experts: int
    dim: int
    width: int
    rate: float = 1.0


PRODUCTION = Shape(2048, 8, 64, 4096, 14336, rate=0.125)
OVERFLOW = Shape(20000, 8, 8, 256, 14336)  # S * F = 160000 * 14336 = 2.29e9 > 2^31
OVERFLOW_CPU = Shape(12, 4, 4, 32, 48)  # --allow-cpu: the same selection and oracle, no overflow
SMALL = Shape(64, 2, 6, 64, 96, rate=0.5)  # two of six experts get no rows (ids drawn below)
TINY = Shape(12, 2, 4, 32, 48, rate=0.5)  # --allow-cpu stands in for every GPU shape


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    cuda_only: str  # why it cannot run on CPU ("" if it can, on tiny shapes)
    run: Callable[[Context], dict]


@dataclass
class Context:
    out: Path
    device: str
    cpu: bool  # the smoke run: tiny shapes under the Triton interpreter
    results: list[dict] = field(default_factory=list)

    def shape(self, shape: Shape) -> Shape:
        return TINY if self.cpu else shape


# ----------------------------------------------------------------------------------------------- inputs
def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0, empty_experts: int = 0):
    """(x_TD, ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD), float leaves requiring grad; the last
    ``empty_experts`` experts get no rows; ``rate`` of the slots consult."""
    from pure_reasoner.benchmarks.kernels import Workload
    from pure_reasoner.benchmarks.kernels import make_inputs as kernel_inputs

    w = Workload("gpu_check", shape.tokens, shape.dim, shape.width, shape.experts, shape.top_k, False)
    x, ids, gates, w1, w3, w2 = kernel_inputs(w, shape.rate, dtype, device, seed)
    if empty_experts:
        used = shape.experts - empty_experts
        ids = torch.where(ids >= used, ids % used, ids)
        ids = torch.where(ids.sort(1).values.diff(1).eq(0).any(1, keepdim=True), -1, ids)  # keep slots distinct
    return x, ids, gates, w1, w3, w2


def fwd_bwd(inputs, impl: str = "triton", deterministic: bool = False, dy=None, **kwargs):
    """y and the gradients of x, gates, w1, w3, w2 for one dy (seeded if not given)."""
    from pure_reasoner.kernels import knowledge_mlp

    x, ids, gates, w1, w3, w2 = inputs
    y = knowledge_mlp(x, ids, gates, w1, w3, w2, impl=impl, deterministic=deterministic, **kwargs)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [x, gates, w1, w3, w2], dy)
    return (y, *grads)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (0 when b is all zero and a equals it)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


# ------------------------------------------------------------------------------------------------ steps
def kernel_tests(ctx: Context) -> dict:
    env = dict(os.environ, PURE_REASONER_TRITON_PIN_CONFIGS="1", PYTHONPATH=str(ROOT))
    files = [str(p) for p in sorted((ROOT / "tests/kernels").glob("test_triton_*.py")) if "aot" not in p.name]
    files += ["tests/kernels/test_combine.py", "tests/kernels/test_saved_memory.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=_step("kernel_tests").budget_s * 2)
    (ctx.out / "kernel_tests.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise AssertionError(f"pytest failed (rc {proc.returncode}): {proc.stdout[-2000:]}")
    return {"summary": proc.stdout.strip().splitlines()[-1]}


def sanitizer(ctx: Context) -> dict:
    tool = _compute_sanitizer()
    if tool is None:
        raise _Skip("compute-sanitizer not found (CUDA toolkit's bin/ not on PATH, no /usr/local/cuda)")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONPATH=str(ROOT))  # see every allocation
    figures = {}
    for check in ("memcheck", "initcheck"):
        cmd = [tool, f"--tool={check}", "--error-exitcode=9", "--target-processes=all", sys.executable, "-m",
               "pure_reasoner.benchmarks.gpu_check", "--single", "small_fwd_bwd", "--out", str(ctx.out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=_step("sanitizer").budget_s * 2)
        (ctx.out / f"sanitizer_{check}.log").write_text(proc.stdout + proc.stderr)
        figures[check] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode:
            raise AssertionError(f"{check} reported errors (rc {proc.returncode}): {proc.stdout[-1500:]}")
    return figures


def small_fwd_bwd(ctx: Context) -> dict:
    """The sanitizers' workload: a small fwd+bwd with two experts that get no rows, both combine modes."""
    inputs = make_inputs(SMALL, torch.bfloat16, ctx.device, empty_experts=2)
    for deterministic in (False, True):
        outs = fwd_bwd(inputs, deterministic=deterministic, max_rows=SMALL.tokens)
        assert all(torch.isfinite(t).all() for t in outs)
    torch.cuda.synchronize()
    return {}


def production(ctx: Context) -> dict:
    """bf16 Triton against the fp32 torch path; the reference runs 8 experts at a time (output and
    gradients are sums over experts; each group's weights alone in fp32 fit in memory)."""
    shape = ctx.shape(PRODUCTION)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16  # the interpreter's bf16 dot is wrong
    inputs = make_inputs(shape, dtype, ctx.device)
    tri = [t.float() for t in fwd_bwd(inputs)]
    x, ids, gates, w1, w3, w2 = inputs
    dy = torch.randn(tri[0].shape, generator=torch.Generator().manual_seed(1)).to(tri[0])
    ref = [torch.zeros_like(t) for t in tri]
    group = 8
    for start in range(0, shape.experts, group):
        stop = min(start + group, shape.experts)
        in_group = (ids >= start) & (ids < stop)
        sub = [x.detach().float().requires_grad_(), torch.where(in_group, ids - start, -1),
               gates.detach().float().requires_grad_(),
               *(w[start:stop].detach().float().requires_grad_() for w in (w1, w3, w2))]
        y, dx, dg, dw1, dw3, dw2 = fwd_bwd(sub, impl="torch", dy=dy)
        ref[0] += y
        ref[1] += dx
        ref[2] += dg
        for i, dw in ((3, dw1), (4, dw3), (5, dw2)):
            ref[i][start:stop] = dw
        del sub, y, dx, dg, dw1, dw3, dw2
    names = ["y", "dx", "dgates", "dw1", "dw3", "dw2"]
    errors = {n: _max_rel(t, r) for n, t, r in zip(names, tri, ref, strict=True)}
    bound = 1e-4 if ctx.cpu else 2e-2  # bf16 inputs rounded once (2^-8) plus fp32 accumulation
    bad = {n: e for n, e in errors.items() if not e <= bound}
    assert not bad, f"relative error above {bound}: {bad}"
    return {"shape": asdict(shape), "dtype": str(dtype), "max_rel_error": errors, "bound": bound}


def overflow(ctx: Context) -> dict:
    """Rows past 2^31 / F in sorted order: the last tokens of the last expert, against the oracle."""
    from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference

    shape = OVERFLOW_CPU if ctx.cpu else OVERFLOW
    x, ids, gates, w1, w3, w2 = make_inputs(shape, torch.float32 if ctx.cpu else torch.bfloat16, ctx.device)
    assert ctx.cpu or shape.tokens * shape.top_k * shape.width > 2**31
    y, dx, dg, *_ = fwd_bwd((x, ids, gates, w1, w3, w2), max_rows=shape.tokens * shape.top_k)
    last = (ids == shape.experts - 1).any(1).nonzero().squeeze(1)[-32:]  # their rows sort last
    sub = [t.detach()[last].cpu().double().requires_grad_() for t in (x, gates)]
    wd = [w.detach().cpu().double() for w in (w1, w3, w2)]
    y_ref = knowledge_mlp_reference(sub[0], ids[last].cpu(), sub[1], *wd)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    dx_ref, dg_ref = torch.autograd.grad(y_ref, sub, dy[last].cpu().double())
    errors = {"y": _max_rel(y[last], y_ref), "dx": _max_rel(dx[last], dx_ref), "dgates": _max_rel(dg[last], dg_ref)}
    bound = 1e-4 if ctx.cpu else 2e-2  # fp32 on CPU; bf16 inputs rounded once plus fp32 accumulation
    assert all(e <= bound for e in errors.values()), errors
    return {"slots_x_F": shape.tokens * shape.top_k * shape.width, "max_rel_error": errors}


def sync_free(ctx: Context) -> dict:
    inputs = make_inputs(SMALL, torch.bfloat16, ctx.device)
    dy = torch.randn(SMALL.tokens, SMALL.dim, device=ctx.device, dtype=torch.bfloat16)  # no copy in the checked part
    for deterministic in (False, True):
        fwd_bwd(inputs, deterministic=deterministic, dy=dy)  # compile and autotune first: tuning synchronises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd_bwd(inputs, deterministic=deterministic, dy=dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {}


def cuda_graph(ctx: Context) -> dict:
    x, ids, gates, w1, w3, w2 = make_inputs(SMALL, torch.bfloat16, ctx.device)
    dy = torch.randn(x.shape, device=ctx.device, dtype=x.dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (compile, autotune) outside the capture
            fwd_bwd((x, ids, gates, w1, w3, w2), dy=dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fwd_bwd((x, ids, gates, w1, w3, w2), dy=dy)
    new = make_inputs(SMALL, torch.bfloat16, ctx.device, seed=5)
    with torch.no_grad():
        for dst, src in zip([x, ids, gates, w1, w3, w2], new, strict=True):
            dst.copy_(src)
    graph.replay()
    eager = fwd_bwd(new, dy=dy)
    diffs = {n: _max_rel(s, e) for n, s, e in zip(["y", "dx", "dg", "dw1", "dw3", "dw2"], static, eager, strict=True)}
    assert all(d <= 1e-2 for d in diffs.values()), diffs
    return {"replay_vs_eager_max_rel": diffs}


def inductor(ctx: Context) -> dict:
    from pure_reasoner.kernels import knowledge_mlp

    inputs = make_inputs(ctx.shape(SMALL), torch.float32 if ctx.cpu else torch.bfloat16, ctx.device)

    def layer(x, ids, gates, w1, w3, w2):
        return torch.tanh(knowledge_mlp(x * 2, ids, gates.softmax(-1), w1, w3, w2, impl="triton")) + x

    backend = "aot_eager" if ctx.cpu else "inductor"  # CPU smoke: the graph capture, not C++ codegen
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    floats = [inputs[0], *inputs[2:]]
    y_c, y_e = compiled(*inputs), layer(*inputs)
    dy = torch.randn_like(y_e)
    g_c, g_e = torch.autograd.grad(y_c, floats, dy), torch.autograd.grad(y_e, floats, dy)
    diffs = {"y": _max_rel(y_c, y_e)} | {f"d{i}": _max_rel(a, b) for i, (a, b) in enumerate(zip(g_c, g_e, strict=True))}
    assert all(d <= 1e-2 for d in diffs.values()), diffs
    return {"backend": backend, "compiled_vs_eager_max_rel": diffs}


def determinism(ctx: Context) -> dict:
    shape = ctx.shape(PRODUCTION if not ctx.cpu else TINY)
    inputs = make_inputs(shape, torch.float32 if ctx.cpu else torch.bfloat16, ctx.device)
    figures = {}
    for deterministic in (False, True):
        a, b = fwd_bwd(inputs, deterministic=deterministic), fwd_bwd(inputs, deterministic=deterministic)
        figures[f"deterministic={deterministic}"] = {
            n: {"bitwise_equal": bool(torch.equal(p, q)), "max_abs_diff": float((p - q).detach().abs().max())}
            for n, p, q in zip(["y", "dx", "dgates"], a[:3], b[:3], strict=True)
        }
    assert all(v["bitwise_equal"] for v in figures["deterministic=True"].values()), figures
    return figures


def device_guard(ctx: Context) -> dict:
    if torch.cuda.device_count() < 2:
        raise _Skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(0)
    on0 = make_inputs(SMALL, torch.bfloat16, "cuda:0")
    on1 = tuple(t.detach().to("cuda:1").requires_grad_(t.requires_grad) for t in on0)
    ref, got = fwd_bwd(on0, deterministic=True), fwd_bwd(on1, deterministic=True)
    assert all(torch.equal(r.cpu(), g.cpu()) for r, g in zip(ref, got, strict=True))
    return {"current_device": torch.cuda.current_device()}


def perf(ctx: Context) -> dict:
    from pure_reasoner.benchmarks.common import time_interleaved
    from pure_reasoner.benchmarks.kernels import Workload, mlp_cases, mlp_cost, mlp_providers

    shape = ctx.shape(PRODUCTION)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    peak = _bf16_peak()
    rows = []
    for rate in (0.125, 1.0):
        w = Workload(f"production@{rate}", shape.tokens, shape.dim, shape.width, shape.experts, shape.top_k, False)
        inputs = make_inputs(Shape(**{**asdict(shape), "rate": rate}), dtype, ctx.device)
        providers = mlp_providers(inputs, w, "cuda" if not ctx.cpu else "cpu")
        if ctx.cpu:
            providers = {k: v for k, v in providers.items() if k == "torch"}
        timings = time_interleaved(mlp_cases(providers, inputs), repeats=2 if ctx.cpu else 5, device=ctx.device)
        for (provider, mode), t in timings.items():
            flops, _ = mlp_cost(w, inputs[1], mode, torch.empty(0, dtype=dtype).element_size())
            tflops = flops / t.median_s / 1e12
            rows.append({"rate": rate, "provider": provider, "mode": mode, "ms": t.median_s * 1e3,
                         "TFLOP/s": tflops, "share_of_peak": tflops / peak if peak else None})
        if not ctx.cpu:
            rows += _triton_kernel_rates(inputs, shape, peak, rate)
            rows += _sonic_moe(shape, rate, peak)
    return {"bf16_peak_TFLOPs": peak, "rows": rows}


def _triton_kernel_rates(inputs, shape: Shape, peak: float | None, rate: float) -> list[dict]:
    """Per-kernel device time of one Triton fwd+bwd (profiler), with each kernel's FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    routed = int((inputs[1] >= 0).sum())
    gemm = 2.0 * routed * shape.dim * shape.width  # one [R, D] x [D, F] product
    flops = {"_gather_swiglu_fwd_kernel": 2 * gemm, "_down_scatter_fwd_kernel": gemm,
             "_down_swiglu_bwd_kernel": gemm, "_gather_swiglu_bwd_kernel": 2 * gemm,
             "_grouped_wgrad_kernel": 3 * gemm}
    fwd_bwd(inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(inputs)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        name = next((k for k in flops if k in event.key), None)
        if name is None:
            continue
        seconds = event.device_time_total / 1e6
        tflops = flops[name] / seconds / 1e12
        rows.append({"rate": rate, "provider": "triton", "kernel": name, "calls": event.count, "ms": seconds * 1e3,
                     "TFLOP/s": tflops, "share_of_peak": tflops / peak if peak else None})
    return rows


def _sonic_moe(shape: Shape, rate: float, peak: float | None) -> list[dict]:
    """SonicMoE's own layer (its router included) at the same T, K, E, D, F, if it installed."""
    try:
        from sonicmoe import KernelBackendMoE, MoE
        from sonicmoe.enums import ActivationType
    except ImportError as exc:
        return [{"rate": rate, "provider": "sonic-moe", "skipped": f"not installed: {exc}"}]
    from pure_reasoner.benchmarks.common import time_interleaved

    if rate != 1.0:
        return [{"rate": rate, "provider": "sonic-moe", "skipped": "every token consults all K (rate 1 only)"}]
    moe = MoE(num_experts=shape.experts, num_experts_per_tok=shape.top_k, hidden_size=shape.dim,
              intermediate_size=shape.width, activation_function=ActivationType.SWIGLU, add_bias=False,
              std=0.02).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(shape.tokens, shape.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, _ = moe(x, kernel_backend_moe=KernelBackendMoE.sonicmoe)
        out.sum().backward()

    t = time_interleaved({"fwd+bwd": step}, repeats=5, device="cuda")["fwd+bwd"]
    flops = 3 * 3 * 2.0 * shape.tokens * shape.top_k * shape.dim * shape.width
    tflops = flops / t.median_s / 1e12
    return [{"rate": rate, "provider": "sonic-moe", "mode": "fwd+bwd", "ms": t.median_s * 1e3, "TFLOP/s": tflops,
             "share_of_peak": tflops / peak if peak else None}]


STEPS = [
    Step("kernel_tests", 120, "CI runs the CPU suite; this one is the CUDA dtypes and compiled kernels", kernel_tests),
    Step("sanitizer", 60, "compute-sanitizer checks CUDA kernels", sanitizer),
    Step("production", 60, "", production),
    Step("overflow", 20, "", overflow),
    Step("sync_free", 10, "torch.cuda.set_sync_debug_mode is CUDA's", sync_free),
    Step("cuda_graph", 15, "CUDA graphs", cuda_graph),
    Step("inductor", 30, "", inductor),
    Step("determinism", 20, "", determinism),
    Step("device_guard", 10, "two CUDA devices", device_guard),
    Step("perf", 70, "", perf),
]
SINGLE = {"small_fwd_bwd": small_fwd_bwd}


def _step(name: str) -> Step:
    return next(s for s in STEPS if s.name == name)


class _Skip(Exception):
    """A step that cannot run on this machine (the message says why)."""


def _compute_sanitizer() -> str | None:
    import shutil

    found = shutil.which("compute-sanitizer")
    default = Path("/usr/local/cuda/bin/compute-sanitizer")
    return found or (str(default) if default.exists() else None)


def _bf16_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def _machine() -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                 "gpus": torch.cuda.device_count(), "bf16_peak_TFLOPs": _bf16_peak()}
    return info


def plan(names: list[str], cpu: bool) -> list[dict]:
    """What would run, in order, with its budget, or why it is skipped."""
    return [{"step": s.name, "budget_s": s.budget_s, "runs": not (cpu and s.cuda_only),
             "skip_reason": f"CUDA only: {s.cuda_only}" if cpu and s.cuda_only else ""}
            for s in STEPS if s.name in names]


def run_steps(ctx: Context, names: list[str]) -> list[dict]:
    results = []
    for step in (s for s in STEPS if s.name in names):
        record = {"step": step.name, "budget_s": step.budget_s}
        start = time.perf_counter()
        if ctx.cpu and step.cuda_only:
            record |= {"status": "skipped", "reason": f"CUDA only: {step.cuda_only}"}
        else:
            try:
                record |= {"status": "pass", "figures": step.run(ctx)}
            except _Skip as exc:
                record |= {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # a failed check is a result to record; the next step still runs
                record |= {"status": "fail", "error": f"{type(exc).__name__}: {exc}"[:4000]}
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["over_budget"] = record["seconds"] > step.budget_s
        print(f"[gpu_check] {step.name}: {record['status']} ({record['seconds']} s)"
              + (f" {record.get('reason') or record.get('error', '')[:300]}" if record["status"] != "pass" else ""),
              flush=True)
        results.append(record)
        ctx.results = results
        _write(ctx)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    return results


def _write(ctx: Context) -> None:
    install = ctx.out / "install.txt"  # written by gpu_check.sh: what the GPU extras' install did
    payload = {"machine": _machine(), "install": install.read_text().splitlines() if install.exists() else None,
               "plan_budget_s": sum(s.budget_s for s in STEPS), "steps": ctx.results}
    (ctx.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu_check",
                        help="directory for gpu_check.json and the logs (default: $OUT, else benchmarks/results/)")
    parser.add_argument("--only", help=f"comma-separated steps of {[s.name for s in STEPS]}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run what the Triton interpreter can on tiny shapes (a smoke test)")
    parser.add_argument("--single", choices=sorted(SINGLE), help=argparse.SUPPRESS)  # a sanitizer's workload
    args = parser.parse_args(argv)
    names = [s.name for s in STEPS] if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
    cuda = torch.cuda.is_available()
    cpu = not cuda
    if args.dry_run:
        print(json.dumps({"machine": _machine(), "plan": plan(names, cpu),
                          "budget_s": sum(s.budget_s for s in STEPS if s.name in names)}, indent=1))
        return 0
    if cpu and not args.allow_cpu:
        parser.error("no CUDA device: this check is for a GPU (--dry-run shows the plan; --allow-cpu smoke-runs it)")
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--allow-cpu needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, device="cuda" if cuda else "cpu", cpu=cpu)
    if args.single:
        SINGLE[args.single](ctx)
        return 0
    results = run_steps(ctx, names)
    failed = [r["step"] for r in results if r["status"] == "fail"]
    print(f"[gpu_check] {len(results)} steps: {len(failed)} failed {failed}; JSON: {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

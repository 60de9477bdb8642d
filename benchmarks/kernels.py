"""Knowledge-path kernels: ours against the oracle and HF transformers' grouped_mm experts, on a roofline.

    python -m pure_reasoner.benchmarks.kernels [--quick] [--json PATH] [--repeats N]

Ops: routing metadata (forward only) and the knowledge-expert MLP (fwd, bwd, fwd+bwd), at consult
rates 1/8 and 1 (share of the T*K slots that go to a real expert). Providers on CPU: ``torch`` (ours),
``reference`` (the loop oracle, small workloads only) and ``hf_grouped_mm`` (transformers'
``grouped_mm_experts_forward``, idle slots as its expert-parallel sentinel so it skips them too). On a
GPU also ``triton`` and ``megablocks``; each prints a "skipped: ..." line when it cannot run.

Each row reports the realized FLOPs and the least bytes the op must move (each input and each weight
of a used expert read once, each output and gradient written once), the achieved GFLOP/s and GB/s, the
roofline time ``max(FLOPs / P, bytes / W)`` with P and W measured in the same run
(``benchmarks.common.measure_roofline``), and time / roofline. fwd+bwd rows also give time over the two
passes' rooflines added up (``x_pass_bound``: the backward reads the weights again, ``common.with_pass_bound``).

On CPU, run under ``source scripts/cpu_env.sh`` (jemalloc that keeps freed pages, on huge pages): a
backward writes fresh [E, D, F] weight gradients, and PyTorch's own allocator returns them to the OS
after every call, so each call re-faults 256 MiB per weight (75 ms to seconds here, the latter when
the kernel compacts memory for huge pages). ``THP_MEM_ALLOC_ENABLE=1`` helps less. Both settings
are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.benchmarks.common import (
    Roofline,
    Timing,
    measure_roofline,
    ours_engine,
    print_table,
    time_interleaved,
    with_pass_bound,
    write_json,
)
from pure_reasoner.kernels import NOT_CONSULTED, knowledge_mlp
from pure_reasoner.kernels.routing.metadata import routing_metadata
from pure_reasoner.kernels.routing.reference import routing_metadata_reference

MODES = ("fwd", "bwd", "fwd+bwd")
RATES = (0.125, 1.0)


@dataclass(frozen=True)
class Workload:
    """One knowledge-path shape: T tokens, D model dim, F expert width, E experts, K slots per token."""

    name: str
    tokens: int
    dim: int
    width: int
    experts: int
    top_k: int
    with_reference: bool  # the loop oracle is only affordable on small shapes


# default: a 4096-token micro-batch through one MoE layer at d_model 1024 with 64 experts of width
# 1024, top-2 (OLMoE-like expert count and width, scaled to one CPU socket).
WORKLOADS = (
    Workload("small", tokens=256, dim=256, width=256, experts=16, top_k=2, with_reference=True),
    Workload("default", tokens=4096, dim=1024, width=1024, experts=64, top_k=2, with_reference=False),
)
QUICK = Workload("tiny", tokens=32, dim=32, width=32, experts=4, top_k=2, with_reference=True)


def make_inputs(w: Workload, rate: float, dtype: torch.dtype, device: str, seed: int = 0):
    """Random routing with ``rate`` of the slots consulting (distinct experts per token), inputs and weights."""
    gen = torch.Generator().manual_seed(seed)
    ids_TK = torch.rand(w.tokens, w.experts, generator=gen).argsort(1)[:, : w.top_k]
    ids_TK = torch.where(torch.rand(w.tokens, w.top_k, generator=gen) < rate, ids_TK, NOT_CONSULTED)
    x_TD = torch.randn(w.tokens, w.dim, generator=gen)
    gates_TK = torch.rand(w.tokens, w.top_k, generator=gen)
    weights = [torch.randn(w.experts, a, b, generator=gen) / a**0.5 for a, b in ((w.dim, w.width),) * 2]
    weights.append(torch.randn(w.experts, w.width, w.dim, generator=gen) / w.width**0.5)
    floats = [t.to(device, dtype).requires_grad_() for t in (x_TD, *weights)]
    return floats[0], ids_TK.to(device), gates_TK.to(device).requires_grad_(), *floats[1:]


def mlp_cost(w: Workload, ids_TK: torch.Tensor, mode: str, itemsize: int) -> tuple[float, float]:
    """(realized FLOPs, least bytes) of the knowledge MLP in ``mode`` for this routing."""
    routed = ids_TK[ids_TK >= 0]
    rows, used_experts = routed.numel(), torch.unique(routed).numel()
    consulting_tokens = int((ids_TK >= 0).any(1).sum())
    gemm_flops = 2 * rows * w.dim * w.width  # one [rows, D] x [D, F] product
    expert_bytes = 3 * w.dim * w.width * itemsize  # w1, w3, w2 of one expert
    slots = ids_TK.numel() * (ids_TK.element_size() + 4)  # ids + fp32 gates
    tokens_bytes = w.tokens * w.dim * itemsize
    read = consulting_tokens * w.dim * itemsize + used_experts * expert_bytes + slots
    fwd_written, bwd_written = tokens_bytes, tokens_bytes + w.experts * expert_bytes + ids_TK.numel() * 4
    if mode == "fwd":
        return 3 * gemm_flops, read + fwd_written
    if mode == "bwd":
        return 6 * gemm_flops, read + tokens_bytes + bwd_written  # + dy read
    return 9 * gemm_flops, read + tokens_bytes + fwd_written + bwd_written


def hf_experts(w1_EDF: torch.Tensor, w3_EDF: torch.Tensor, w2_EFD: torch.Tensor, idle_slots: bool):
    """transformers' grouped_mm experts on our weights, in its preferred layout (converted once, here)."""
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(is_transposed=True)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = w1_EDF.shape[0]
            self.act_fn = F.silu
            self.gate_up_proj = nn.Parameter(torch.cat([w1_EDF, w3_EDF], dim=2).detach())  # [E, D, 2F]
            self.down_proj = nn.Parameter(w2_EFD.detach().clone())  # [E, F, D]

        def forward(self, hidden_states, top_k_index, top_k_weights):  # replaced by the decorator
            raise NotImplementedError

    module = Experts(SimpleNamespace(_experts_implementation="grouped_mm"))
    # Its expert-parallel sentinel (id E) is how it skips slots: sorted last, never multiplied.
    module._is_expert_parallel = idle_slots
    return module


@dataclass(frozen=True)
class Provider:
    """One implementation: ``fn(x_TD, gates_TK) -> y_TD`` and the weights its gradients are taken for."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weights: tuple[torch.Tensor, ...]


def mlp_providers(inputs, w: Workload, device: str) -> dict[str, Provider]:
    """Every provider that can run here (triton and megablocks only on CUDA)."""
    x_TD, ids_TK, gates_TK, w1, w3, w2 = inputs

    def ours(impl):
        return Provider(lambda x, g: knowledge_mlp(x, ids_TK, g, w1, w3, w2, impl=impl), (w1, w3, w2))

    providers = {"torch": ours("torch")}
    if w.with_reference:
        providers["reference"] = ours("reference")
    hf = hf_experts(w1, w3, w2, idle_slots=bool((ids_TK < 0).any())).to(device)
    hf_ids_TK = torch.where(ids_TK < 0, w.experts, ids_TK)
    providers["hf_grouped_mm"] = Provider(lambda x, g: hf(x, hf_ids_TK, g), tuple(hf.parameters()))
    if device == "cuda":
        providers["triton"] = ours("triton")
        if importlib.util.find_spec("megablocks") and importlib.util.find_spec("grouped_gemm"):
            providers["megablocks"] = ours("megablocks")
    return providers


def mlp_cases(providers: dict[str, Provider], inputs) -> dict[tuple[str, str], Callable[[], None]]:
    """(provider, mode) -> zero-argument callable doing one unit of that work (no .grad accumulation)."""
    x_TD, _, gates_TK, *_ = inputs
    dy_TD = torch.randn_like(x_TD)
    cases = {}
    for name, p in providers.items():
        wrt = (x_TD, gates_TK, *p.weights)
        y_kept = p.fn(x_TD, gates_TK)  # a graph kept for the bwd-only timing

        def fwd(p=p):
            with torch.no_grad():
                p.fn(x_TD, gates_TK)

        def bwd(y=y_kept, wrt=wrt):
            torch.autograd.grad(y, wrt, dy_TD, retain_graph=True)

        def fwd_bwd(p=p, wrt=wrt):
            torch.autograd.grad(p.fn(x_TD, gates_TK), wrt, dy_TD)

        cases.update({(name, "fwd"): fwd, (name, "bwd"): bwd, (name, "fwd+bwd"): fwd_bwd})
    return cases


def check_providers_agree(providers: dict[str, Provider], inputs, dtype: torch.dtype) -> None:
    """Every provider computes the same y as ours, so the timings compare equal work."""
    x_TD, _, gates_TK, *_ = inputs
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        ours = providers["torch"].fn(x_TD, gates_TK).float()
        for name, p in providers.items():
            torch.testing.assert_close(p.fn(x_TD, gates_TK).float(), ours, rtol=tol, atol=tol, msg=name)


def _engine(provider: str, w: Workload, where: str) -> str:
    """The GEMM engine a provider ran on (CPU fp32: the one ``kernels.engines`` chose for ours)."""
    if where != "cpu float32":
        return provider
    return {"torch": ours_engine(w.dim, w.width), "reference": "mkl (per-token loop)"}.get(provider, "grouped_mm")


def _row(w: Workload, rate: float, op: str, provider: str, mode: str, t: Timing, flops, bytes_, roof, where):
    seconds, roof_s = t.median_s, roof.time_s(flops, bytes_)
    return {
        "device": where, "workload": w.name, "T": w.tokens, "D": w.dim, "F": w.width, "E": w.experts,
        "K": w.top_k, "rate": rate,
        "op": op, "provider": provider, "mode": mode, "ms": seconds * 1e3, "min_ms": t.min_s * 1e3,
        "GFLOP/s": flops / seconds / 1e9, "GB/s": bytes_ / seconds / 1e9,
        "roofline_ms": roof_s * 1e3, "x_roofline": seconds / roof_s, "flops": flops, "bytes": bytes_,
        "engine": _engine(provider, w, where) if op == "knowledge_mlp" else "",
    }  # fmt: skip


def bench_routing(w: Workload, rate: float, ids_TK, roof: Roofline, repeats: int, device: str) -> list[dict]:
    """Routing metadata: no FLOPs; reads the ids, writes three [S] orders and the [E] counts/offsets."""
    cases = {"torch": lambda: routing_metadata(ids_TK, w.experts)}
    if w.with_reference:
        cases["reference"] = lambda: routing_metadata_reference(ids_TK, w.experts)
    if device == "cuda":
        from pure_reasoner.kernels.routing.triton_routing import routing_metadata_triton

        cases["triton"] = lambda: routing_metadata_triton(ids_TK, w.experts)
    bytes_ = ids_TK.numel() * (ids_TK.element_size() + 3 * 8) + w.experts * 12
    timings = time_interleaved(cases, repeats=repeats, device=device)
    return [_row(w, rate, "routing", n, "fwd", t, 0, bytes_, roof, device) for n, t in timings.items()]


def bench_mlp(w: Workload, rate: float, inputs, roof: Roofline, repeats: int, device: str, dtype) -> list[dict]:
    providers = mlp_providers(inputs, w, device)
    check_providers_agree(providers, inputs, dtype)
    timings = time_interleaved(mlp_cases(providers, inputs), repeats=repeats, device=device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows = []
    where = _where(device, dtype)
    for (provider, mode), t in timings.items():
        flops, bytes_ = mlp_cost(w, inputs[1], mode, itemsize)
        rows.append(_row(w, rate, "knowledge_mlp", provider, mode, t, flops, bytes_, roof, where))
    return with_pass_bound(rows, ("device", "workload", "rate", "op", "provider"), "roofline_ms", "ms")


def _where(device: str, dtype: torch.dtype) -> str:
    return f"{device} {str(dtype).removeprefix('torch.')}"


def run(workloads, repeats: int, device: str, dtype: torch.dtype, quick: bool) -> tuple[list[dict], Roofline]:
    roof = measure_roofline(device, dtype, **(dict(n=256, copy_mb=8, repeats=2) if quick else {}))
    engines = ", ".join(f"{k} {v:.1f}" for k, v in roof.engines.items())
    print(f"roofline on {device} {dtype}: P = {roof.matmul_gflops:.1f} GFLOP/s (dense matmul: {engines}), ", end="")
    print(f"W = {roof.copy_gbs:.1f} GB/s (copy)")
    rows = []
    for w in workloads:
        for rate in RATES:
            inputs = make_inputs(w, rate, dtype, device)
            rows += bench_routing(w, rate, inputs[1], roof, repeats, device)
            rows += bench_mlp(w, rate, inputs, roof, repeats, device, dtype)
    return rows, roof


COLUMNS = ["device", "workload", "rate", "op", "provider", "mode", "ms", "min_ms", "GFLOP/s", "GB/s"]
COLUMNS += ["roofline_ms", "x_roofline", "x_pass_bound", "engine"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny workload, 2 repeats (a smoke run)")
    parser.add_argument("--json", help="also write the rows, machine and roofline to this JSON file")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; quick: 2)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    workloads = (QUICK,) if args.quick else WORKLOADS
    huge_pages = os.environ.get("THP_MEM_ALLOC_ENABLE", "")
    tuned = "GLIBC_TUNABLES" in os.environ or "jemalloc" in os.environ.get("LD_PRELOAD", "")
    if huge_pages != "1" and not tuned:
        print("note: no malloc tuning (kernels.malloc_tuning, jemalloc) nor THP_MEM_ALLOC_ENABLE=1: every call "
              "re-faults its fresh large tensors (weight gradients) page by page")

    rows, roof = run(workloads, repeats, "cpu", torch.float32, args.quick)
    rooflines = {"cpu float32": asdict(roof)}
    if torch.cuda.is_available():
        gpu_rows, gpu_roof = run(workloads, repeats, "cuda", torch.bfloat16, args.quick)
        rows, rooflines["cuda bfloat16"] = rows + gpu_rows, asdict(gpu_roof)
        if "megablocks" not in {r["provider"] for r in gpu_rows}:
            print("skipped: megablocks not installed (pip install -e '.[gpu]')")
    else:
        print("skipped: no CUDA (triton and megablocks run on a GPU; the interpreter is for tests, not timing)")
    print_table(rows, COLUMNS, title=f"knowledge-path kernels, median of {repeats}")
    if args.json:
        meta = dict(rooflines=rooflines, thp_mem_alloc_enable=huge_pages, repeats=repeats)
        write_json(args.json, rows, workloads=[asdict(w) for w in workloads], **meta)


if __name__ == "__main__":
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # keeps freed memory, huge pages: see kernels.malloc_tuning
    main()

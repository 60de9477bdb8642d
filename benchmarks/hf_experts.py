"""Stock transformers MoE blocks with their routed experts run by ours (``"pure_reasoner"``), ``grouped_mm`` and
``eager``: the same block, the same weights and inputs, only ``config._experts_implementation`` changes.

    python -m pure_reasoner.benchmarks.hf_experts [--quick] [--json PATH] [--repeats N] [--dtype float32|bfloat16]

Blocks: Qwen2-MoE (with its gated shared expert), Qwen3-MoE, OLMoE and Mixtral, each at a named shape scaled to
one CPU socket from the published model (ratios of width, experts and top-k kept). Modes: ``fwd`` (no grad) and
``fwd+bwd`` (gradients of the input and of every block weight). Each row: median and min of the repeats, the
block's matmul GFLOP/s (routed experts, shared expert, router; 2 FLOPs per multiply-add, the backward twice the
forward), and the time relative to ``grouped_mm`` (transformers' default). Providers are checked to agree first.

On CPU, run under ``source scripts/cpu_env.sh`` on a quiet machine (see ``benchmarks.kernels``); the JSON records
the CPU model, thread count and load.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch

from pure_reasoner.benchmarks.common import ours_engine, print_table, time_interleaved, write_json
from pure_reasoner.benchmarks.peers import _init_

PROVIDERS = ("pure_reasoner", "grouped_mm", "eager")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Workload:
    """One MoE block: T tokens, D model dim, F routed-expert width, E experts, K top-k, F_s shared-expert width."""

    name: str
    arch: str
    tokens: int
    dim: int
    width: int
    experts: int
    top_k: int
    shared_width: int = 0


# The published shapes, D halved to quartered with widths scaled alike (E and K kept, but Qwen3-MoE's 128 experts
# halved): Qwen2-MoE-A2.7B (D 2048, F 1408, E 60, K 4, F_s 5632), Qwen3-30B-A3B (D 2048, F 768, E 128, K 8),
# OLMoE-1B-7B (D 2048, F 1024, E 64, K 8), Mixtral-8x7B (D 4096, F 14336, E 8, K 2).
WORKLOADS = (
    Workload("qwen2_moe", "qwen2_moe", tokens=2048, dim=1024, width=704, experts=60, top_k=4, shared_width=2816),
    Workload("qwen3_moe", "qwen3_moe", tokens=2048, dim=1024, width=384, experts=64, top_k=8),
    Workload("olmoe", "olmoe", tokens=2048, dim=1024, width=512, experts=64, top_k=8),
    Workload("mixtral", "mixtral", tokens=2048, dim=1024, width=3584, experts=8, top_k=2),
)
QUICK = tuple(Workload(f"tiny_{w.arch}", w.arch, tokens=32, dim=32, width=16, experts=4, top_k=2,
                       shared_width=48 if w.shared_width else 0) for w in WORKLOADS)


def build_block(w: Workload, dtype: torch.dtype):
    """The architecture's sparse MoE block at ``w``'s shape, initialised like ``benchmarks.peers`` (Normal(0, 0.02):
    transformers leaves a bare block's tensors uninitialised)."""
    import transformers as tf

    common = dict(hidden_size=w.dim, num_experts_per_tok=w.top_k, hidden_act="silu", experts_implementation="eager")
    if w.arch == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        cfg = tf.Qwen2MoeConfig(**common, moe_intermediate_size=w.width, num_experts=w.experts,
                                shared_expert_intermediate_size=w.shared_width, norm_topk_prob=True)
    elif w.arch == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = tf.Qwen3MoeConfig(**common, moe_intermediate_size=w.width, num_experts=w.experts, norm_topk_prob=True)
    elif w.arch == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        cfg = tf.OlmoeConfig(**common, intermediate_size=w.width, num_experts=w.experts)
    elif w.arch == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = tf.MixtralConfig(**common, intermediate_size=w.width, num_local_experts=w.experts)
    else:
        raise ValueError(f"unknown architecture {w.arch!r}")
    return _init_(Block(cfg).to(dtype)), cfg


def block_flops(w: Workload) -> float:
    """Forward matmul FLOPs: T*K routed SwiGLU rows, the shared expert (and its gate) on T rows, the router."""
    swiglu = 2.0 * 3 * w.dim
    shared = w.tokens * (swiglu * w.shared_width + 2.0 * w.dim) if w.shared_width else 0.0
    return w.tokens * w.top_k * swiglu * w.width + shared + 2.0 * w.tokens * w.dim * w.experts


def cases(block, cfg, x_BSD: torch.Tensor) -> dict[tuple[str, str], callable]:
    """(provider, mode) -> zero-argument callable: one block call under that experts implementation."""
    dy_BSD = torch.randn_like(x_BSD)
    wrt = (x_BSD, *block.parameters())

    def call(provider: str) -> torch.Tensor:
        cfg._experts_implementation = provider
        return block(x_BSD)

    out = {}
    for provider in PROVIDERS:
        def fwd(provider=provider):
            with torch.no_grad():
                call(provider)

        def fwd_bwd(provider=provider):
            torch.autograd.grad(call(provider), wrt, dy_BSD)

        out[(provider, "fwd")], out[(provider, "fwd+bwd")] = fwd, fwd_bwd
    return out


def check_agree(block, cfg, x_BSD: torch.Tensor, dtype: torch.dtype) -> None:
    """Every provider's output equals eager's (the timings compare equal work)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        cfg._experts_implementation = "eager"
        want = block(x_BSD).float()
        for provider in PROVIDERS:
            cfg._experts_implementation = provider
            torch.testing.assert_close(block(x_BSD).float(), want, rtol=tol, atol=tol, msg=provider)


def bench(w: Workload, repeats: int, dtype: torch.dtype) -> list[dict]:
    import pure_reasoner.moe.hf  # noqa: F401  registers "pure_reasoner"

    block, cfg = build_block(w, dtype)
    x_BSD = torch.randn(1, w.tokens, w.dim, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    check_agree(block, cfg, x_BSD, dtype)
    timings = time_interleaved(cases(block, cfg, x_BSD), repeats=repeats)
    fwd_flops = block_flops(w)
    rows = []
    for (provider, mode), t in timings.items():
        flops = fwd_flops if mode == "fwd" else 3 * fwd_flops
        rows.append({"name": w.name, "arch": w.arch, "T": w.tokens, "D": w.dim, "F": w.width, "E": w.experts,
                     "K": w.top_k, "F_s": w.shared_width, "dtype": str(dtype).removeprefix("torch."),
                     "provider": provider, "mode": mode,
                     "ms": t.median_s * 1e3, "min_ms": t.min_s * 1e3, "GFLOP/s": flops / t.median_s / 1e9,
                     "vs_grouped_mm": t.median_s / timings[("grouped_mm", mode)].median_s,
                     "engine": _engine(provider, w, dtype)})
    return rows


COLUMNS = ["name", "T", "D", "F", "E", "K", "provider", "mode", "ms", "min_ms", "GFLOP/s", "vs_grouped_mm", "engine"]


def _engine(provider: str, w: Workload, dtype: torch.dtype) -> str:
    """The experts' GEMM engine: ours picks per machine on CPU fp32 (``kernels.engines``); eager loops torch.mm."""
    if dtype != torch.float32:
        return provider
    if provider == "pure_reasoner":
        return ours_engine(w.dim, w.width)
    return {"eager": "mkl (per-expert loop)", "grouped_mm": "grouped_mm"}.get(provider, provider)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny blocks, 2 repeats (a smoke run)")
    parser.add_argument("--json", help="also write the rows and the machine (CPU model included) to this file")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; quick: 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    dtype = getattr(torch, args.dtype)
    workloads = QUICK if args.quick else WORKLOADS
    rows = [row for w in workloads for row in bench(w, repeats, dtype)]
    print_table(rows, COLUMNS, title=f"transformers MoE blocks by experts implementation ({args.dtype} on CPU), "
                                     f"median of {repeats}")
    if args.json:
        write_json(args.json, rows, workloads=[asdict(w) for w in workloads], repeats=repeats, dtype=args.dtype)


if __name__ == "__main__":
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # keeps freed memory, huge pages: see kernels.malloc_tuning
    main()

"""Layer benchmark: our layer against the reasoning expert alone, a dense SwiGLU of equal active
parameters, HF's Qwen2MoeSparseMoeBlock and DeepSpeed's residual MoE (equal total parameters), and
the dumb oracle (small shapes only); forward, backward and both, at consult rates 0 .. 1.

    python -m pure_reasoner.benchmarks.layer [--quick] [--json PATH] [--plot PATH] [--cases default,large-batch,small]

Shape legend: T tokens, D model dim, F_r reasoning width, F_k knowledge-expert width, E experts, K top-k.

Every case is timed with providers interleaved (medians of repeats, spread as min..max). The roofline
of a case is max(FLOPs / P, bytes / W), with P the GFLOP/s of a large dense matmul and W the GB/s of a
large copy, both measured in this run (the better of a measurement before and after the cases);
FLOPs are the realized matmul FLOPs (forward x1, backward x2, both x3) and bytes the least the op
must move: the input and every weight actually used read once, every output and gradient written
once. Peak memory is that of one extra fwd+bwd per provider (see ``benchmarks.common.peak_memory``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from pure_reasoner.benchmarks import peers
from pure_reasoner.benchmarks.common import (
    Roofline,
    machine,
    measure_roofline,
    peak_memory,
    time_interleaved,
    with_pass_bound,
    write_json,
)
from pure_reasoner.benchmarks.layer_report import check_targets, plot, print_report
from pure_reasoner.benchmarks.peers import Provider, Shapes

RATES = (0.0, 1 / 32, 1 / 8, 1 / 4, 1 / 2, 1.0)
MODES = ("fwd", "bwd", "fwd+bwd")
FLOPS_PER_FWD = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # backward: gradients of the input and of the weights

# Realistic for a small model on CPU, with knowledge holding most parameters: 64 experts carry 201 M of
# the layer's 204 M parameters; at rate 1/8 a token uses 3.9 M of them.
CASES = {
    "default": Shapes("default", tokens=4096, d_model=1024, reasoning_width=1024, expert_width=1024, num_experts=64,
                      top_k=2),
    # Four times the tokens: compute dominates the weight traffic, so speedups approach the FLOP ratio.
    "large-batch": Shapes("large-batch", tokens=16384, d_model=1024, reasoning_width=1024, expert_width=1024,
                          num_experts=64, top_k=2),
    # Small enough for the per-token oracle loop and HF's eager (per-expert loop) experts.
    "small": Shapes("small", tokens=256, d_model=256, reasoning_width=256, expert_width=256, num_experts=16, top_k=2),
}
QUICK = {
    "default": Shapes("default", tokens=128, d_model=32, reasoning_width=32, expert_width=32, num_experts=8, top_k=2),
    "large-batch": Shapes("large-batch", tokens=512, d_model=32, reasoning_width=32, expert_width=32, num_experts=8,
                          top_k=2),
    "small": Shapes("small", tokens=64, d_model=16, reasoning_width=16, expert_width=16, num_experts=4, top_k=2),
}
# Modes, repeats and warmup per case. The large batch runs fwd+bwd only: it is there for the FLOP-ratio
# target, and its backward alone would double a run that already takes most of the time.
PLAN = {"default": (MODES, 5, 1), "large-batch": (("fwd+bwd",), 3, 1), "small": (MODES, 5, 1)}
QUICK_PLAN = {"default": (MODES, 2, 1), "large-batch": (("fwd+bwd",), 1, 0), "small": (MODES, 1, 0)}


def build_providers(shapes: Shapes, x_TD: torch.Tensor) -> list[Provider]:
    """Ours at every rate, the reasoning expert, dense at every rate > 0, the peers (and, on the small
    case, the oracle at every rate and HF's eager experts)."""
    layer = peers.build_ours(shapes)
    providers = [peers.ours("ours", layer, shapes, x_TD, r) for r in RATES]
    providers.append(peers.reasoning_alone(shapes))
    providers += [peers.dense(shapes, r) for r in RATES if r > 0]
    providers += [peers.qwen2_moe(shapes, x_TD), peers.deepspeed_moe(shapes, x_TD)]
    if shapes.name == "small":
        providers += [peers.oracle(layer, shapes, x_TD, r) for r in RATES]
        providers.append(peers.qwen2_moe(shapes, x_TD, experts_implementation="eager"))
    return providers


def _key(p: Provider) -> str:
    return f"{p.name}@{p.consult_rate:.4g}"


def _mode_cases(
    providers: Sequence[Provider], mode: str, x_TD: torch.Tensor, dy_TD: torch.Tensor
) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Callables for one mode, and their untimed setups. Every setup drops the previous call's
    gradients, as ``zero_grad(set_to_none=True)`` does, so every timed backward allocates fresh ones;
    for ``bwd`` it also runs the forward and hands the output to the timed call."""
    cases, setups = {}, {}
    for p in providers:
        params = [x_TD, *p.module.parameters()]

        def clear(params=params):
            for q in params:
                q.grad = None

        if mode == "fwd":
            setups[_key(p)], cases[_key(p)] = clear, lambda _, p=p: p.call(x_TD)
        elif mode == "bwd":
            setups[_key(p)] = lambda p=p, clear=clear: (clear(), p.call(x_TD))[1]
            cases[_key(p)] = lambda y_TD: y_TD.backward(dy_TD)
        else:
            setups[_key(p)], cases[_key(p)] = clear, lambda _, p=p: p.call(x_TD).backward(dy_TD)
    return cases, setups


def _memory(p: Provider, x_TD: torch.Tensor, dy_TD: torch.Tensor) -> dict:
    """Peak tensor memory of one fwd+bwd; activations = peak minus the gradients it allocated."""
    params = list(p.module.parameters())
    x_TD.grad = None
    for q in params:
        q.grad = None
    mem = peak_memory(lambda: p.call(x_TD).backward(dy_TD))
    grad_bytes = sum(q.grad.nbytes for q in [x_TD, *params] if q.grad is not None)
    for q in params:
        q.grad = None
    return {"peak_bytes": mem.peak_bytes, "grad_bytes": grad_bytes, "activation_bytes": mem.peak_bytes - grad_bytes}


def _record(p: Provider, shapes: Shapes, mode: str, timing) -> dict:
    """Everything about one (provider, mode) that does not depend on the roofline."""
    itemsize = torch.empty((), dtype=shapes.dtype).element_size()
    act_bytes = shapes.tokens * shapes.d_model * itemsize
    # Least traffic: x, y (and dy, dx) once each; weights read once; weight gradients written once.
    bytes_moved = {"fwd": 2 * act_bytes + p.weight_bytes, "bwd": 3 * act_bytes + 2 * p.weight_bytes,
                   "fwd+bwd": 4 * act_bytes + 2 * p.weight_bytes}[mode]
    flops = p.mode_flops(mode)
    return {
        "case": shapes.name, "provider": p.name, "consult_rate": p.consult_rate, "mode": mode,
        "tokens": shapes.tokens, "time_s": timing.median_s, "min_s": timing.min_s, "max_s": timing.max_s,
        "repeats": timing.repeats, "tokens_per_s": shapes.tokens / timing.median_s, "flops": flops,
        "gflops_per_s": flops / timing.median_s / 1e9, "bytes": bytes_moved, "total_params": p.total_params,
        "routed_rows": p.routed_rows, "touched_experts": p.touched_experts, "engine": p.engine,
    }


def _judge(rec: dict, roof: Roofline) -> dict:
    """Add the roofline fields: least time, measured time over it, fraction of the matmul peak."""
    roofline_s = roof.time_s(rec["flops"], rec["bytes"])
    return {**rec, "peak_fraction": rec["gflops_per_s"] / roof.matmul_gflops, "roofline_s": roofline_s,
            "vs_roofline": rec["time_s"] / roofline_s}


def run_case(shapes: Shapes, modes: Sequence[str], repeats: int, warmup: int) -> tuple[list[dict], dict]:
    """Time every provider in every mode, measure fwd+bwd memory. Returns (records, memory check)."""
    x_TD = torch.randn(shapes.tokens, shapes.d_model, dtype=shapes.dtype, requires_grad=True)
    dy_TD = torch.randn(shapes.tokens, shapes.d_model, dtype=shapes.dtype)
    providers = build_providers(shapes, x_TD.detach())
    records = []
    for mode in modes:
        cases, setups = _mode_cases(providers, mode, x_TD, dy_TD)
        print(f"[{shapes.name}] timing {mode}: {len(cases)} providers x {repeats} repeats", file=sys.stderr)
        timings = time_interleaved(cases, repeats=repeats, warmup=warmup, setup=setups)
        records += [_record(p, shapes, mode, timings[_key(p)]) for p in providers]
    memory = {_key(p): _memory(p, x_TD, dy_TD) for p in providers}
    for rec in records:
        if rec["mode"] == "fwd+bwd":
            rec.update(memory[f"{rec['provider']}@{rec['consult_rate']:.4g}"])
    return records, _memory_vs_experts(shapes, providers, x_TD, dy_TD)


def _memory_vs_experts(shapes: Shapes, providers: Sequence[Provider], x_TD, dy_TD) -> dict:
    """Activation memory of ours at rate 1/4 with E and with E/4 experts (same T, D, widths, K)."""
    fewer = replace(shapes, num_experts=max(shapes.top_k, shapes.num_experts // 4))
    layer = peers.build_ours(fewer)
    small_e = peers.ours("ours", layer, fewer, x_TD.detach(), 1 / 4)
    full_e = next(p for p in providers if p.name == "ours" and abs(p.consult_rate - 1 / 4) < 1e-9)
    return {
        "rate": small_e.consult_rate,
        "activation_bytes": {shapes.num_experts: _memory(full_e, x_TD, dy_TD)["activation_bytes"],
                             fewer.num_experts: _memory(small_e, x_TD, dy_TD)["activation_bytes"]},
        "routed_rows": {shapes.num_experts: full_e.routed_rows, fewer.num_experts: small_e.routed_rows},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.benchmarks.layer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 repeats: a smoke run in seconds")
    parser.add_argument("--json", metavar="PATH", help="write records and checks as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a plot of time and roofline vs consult rate")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"--cases: unknown case(s) {unknown or names}; choose from {list(CASES)}")

    torch.manual_seed(0)
    shapes, plan = (QUICK, QUICK_PLAN) if args.quick else (CASES, PLAN)
    roof_size = dict(n=256, copy_mb=8, repeats=2) if args.quick else {}
    started = time.time()
    roof_before = measure_roofline(**roof_size)
    records, memory_checks, load = [], {}, {}
    for name in names:
        modes, repeats, warmup = plan[name]
        load[name] = {"start": os.getloadavg()}  # other work on the machine skews timings: keep the evidence
        case_records, memory_checks[name] = run_case(shapes[name], modes, repeats, warmup)
        load[name]["end"] = os.getloadavg()
        records += case_records
    roof_after = measure_roofline(**roof_size)
    # Judge against the better of the two measurements: the machine can do at least that much.
    roof = Roofline(max(roof_before.matmul_gflops, roof_after.matmul_gflops),
                    max(roof_before.copy_gbs, roof_after.copy_gbs),
                    {k: max(v, roof_after.engines.get(k, 0.0)) for k, v in roof_before.engines.items()})
    records = with_pass_bound([_judge(r, roof) for r in records], ("case", "provider", "consult_rate"), "roofline_s",
                              "time_s")
    targets = check_targets(records, memory_checks)
    print_report(records, targets, roof_before, roof_after)
    meta = {
        "command": " ".join(["python -m pure_reasoner.benchmarks.layer",
                             *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": time.time() - started,
        "roofline": {"before": vars(roof_before), "after": vars(roof_after), "used": vars(roof)},
        "shapes": {n: {k: str(v) if k == "dtype" else v for k, v in vars(shapes[n]).items()} for n in names},
        "load_avg_1_5_15min": load, "memory_vs_experts": memory_checks, "targets": targets,
    }
    if args.json:
        write_json(args.json, records, **meta)
    if args.plot:
        plot(records, args.plot)
    print("load average (1, 5, 15 min) at the start and end of each case:",
          {n: {k: [round(x, 2) for x in v] for k, v in d.items()} for n, d in load.items()})
    print(f"done in {meta['seconds']:.0f} s; machine: {machine()}")
    return 0


if __name__ == "__main__":
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # keeps freed memory, huge pages: see kernels.malloc_tuning
    sys.exit(main())

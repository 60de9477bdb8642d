"""Fuzz ``kernels.knowledge_mlp`` (impl='torch', compact and masked) against the loop reference.

    python scripts/fuzz_kernels.py --cases 300 --seed 0

Shape legend: T tokens, K slots per token, D model dim, F expert width, E experts.

Every case draws fresh shapes and routing from the seed: T in 1..64, D and F in 1..48 (aligned and not),
E in 1..9, K in 1..E, a share of idle slots (-1) in [0, 1], fp32 or fp64. Each fifth case is forced into
an edge: T=1, no token consults, every slot to one expert, K=E, or duplicate-free routing of every
token to every expert. Half the cases bound the rows whose activations the backward keeps (``max_rows``
in 0..T*K: the masked path recomputes the rest) and half combine in slot order (``deterministic``).
Each case checks the output and the gradient of every input (x, gates, w1, w3, w2) against the
reference; the fast path must also never produce a non-finite value on finite input.
Prints the count of cases, the count per edge kind and any failure; exit status 1 on a failure.

``--poison`` makes ``grouped_mm`` fill the rows it leaves unwritten (past the last expert's offset)
with NaN, as uninitialised memory may: the masked path must keep them out of the output and of
every gradient.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

EDGES = ("T=1", "no-consults", "one-expert", "K=E", "dense")
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def draw(gen: torch.Generator, case: int) -> tuple[str, dict]:
    """One case: its kind and the sizes/routing knobs, from ``gen``."""

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    kind = EDGES[(case // 5) % len(EDGES)] if case % 5 == 4 else "random"
    num_experts = randint(1, 9)
    spec = {
        "T": randint(1, 64), "D": randint(1, 48), "F": randint(1, 48), "E": num_experts,
        "K": randint(1, num_experts), "idle": float(torch.rand((), generator=gen)), "one": None,
        "dtype": torch.float64 if randint(0, 1) else torch.float32, "compact": bool(randint(0, 1)),
    }  # fmt: skip
    spec["max_rows"] = randint(0, spec["T"] * spec["K"]) if randint(0, 1) else None
    spec["deterministic"] = bool(randint(0, 1))
    if kind == "T=1":
        spec["T"] = 1
        spec["max_rows"] = None if spec["max_rows"] is None else min(spec["max_rows"], spec["K"])
    elif kind == "no-consults":
        spec["idle"] = 1.0
    elif kind == "one-expert":
        spec["one"], spec["idle"] = randint(0, num_experts - 1), 0.0
    elif kind in ("K=E", "dense"):
        spec["K"] = num_experts
        spec["idle"] = 0.0 if kind == "dense" else spec["idle"]
    return kind, spec


def inputs(gen: torch.Generator, s: dict):
    """x_TD, ids_TK, gates_TK, [w1_EDF, w3_EDF, w2_EFD] (leaf tensors needing grad)."""
    from pure_reasoner.kernels.expert_mlp.random_inputs import random_mlp_inputs

    x_TD, ids_TK, gates_TK, *weights = random_mlp_inputs(s["T"], s["D"], s["F"], s["E"], s["K"], s["idle"],
                                                         s["dtype"], one_expert=s["one"], generator=gen)
    return x_TD, ids_TK, gates_TK, weights


def check(gen: torch.Generator, s: dict) -> str:
    """'' when the fast path matches the reference in output and every gradient, else what differed."""
    from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
    from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch

    x_TD, ids_TK, gates_TK, weights = inputs(gen, s)
    fast = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights, compact=s["compact"], max_rows=s["max_rows"],
                               deterministic=s["deterministic"])
    ref = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, *weights)
    tol = TOLERANCE[s["dtype"]]
    if not torch.isfinite(fast).all():
        return "non-finite output"
    try:
        torch.testing.assert_close(fast, ref.to(fast.dtype), **tol)
    except AssertionError as err:
        return f"output: {err}"
    grad_TD = torch.randn(ref.shape, dtype=ref.dtype, generator=gen)
    leaves = [x_TD, gates_TK, *weights]
    fast_grads = torch.autograd.grad(fast, leaves, grad_TD, allow_unused=True) if fast.requires_grad else [None] * 5
    ref_grads = torch.autograd.grad(ref, leaves, grad_TD, allow_unused=True) if ref.requires_grad else [None] * 5
    for name, f, r in zip(("x", "gates", "w1", "w3", "w2"), fast_grads, ref_grads, strict=True):
        if r is None:  # the reference never touched this input (nothing routed there): the gradient is zero
            if f is not None and f.abs().max() != 0:
                return f"grad {name}: nonzero where the reference has none"
            continue
        try:
            torch.testing.assert_close(f.to(r.dtype), r, **tol)
        except (AssertionError, AttributeError) as err:
            return f"grad {name}: {err}"
    return ""


@contextmanager
def poisoned_grouped_mm():
    """``kernels.expert_mlp.torch_mlp``'s ``grouped_mm`` with its unwritten rows set to NaN."""
    import pure_reasoner.kernels.expert_mlp.torch_mlp as torch_mlp

    real = torch_mlp.F.grouped_mm

    def grouped_mm(x_RI, w_EIO, offs):
        out_RO = real(x_RI, w_EIO, offs=offs).clone()
        if w_EIO.dim() == 3:  # 2-D x 3-D (activations): rows past offs[-1] are unwritten
            out_RO[int(offs[-1]) :] = float("nan")
        return out_RO  # 2-D x 2-D (weight gradients) is [E, I, O]: every expert is written

    torch_mlp.F.grouped_mm = grouped_mm
    try:
        yield
    finally:
        torch_mlp.F.grouped_mm = real


def fuzz(cases: int, seed: int) -> tuple[Counter, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    kinds, failures = Counter(), []
    for case in range(cases):
        kind, spec = draw(gen, case)
        kinds[kind] += 1
        problem = check(gen, spec)
        if problem:
            failures.append(f"case {case} ({kind}, {spec}): {problem}")
    return kinds, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poison", action="store_true", help="NaN in the rows grouped_mm leaves unwritten")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    torch.set_num_threads(1)
    if args.poison:
        with poisoned_grouped_mm():
            kinds, failures = fuzz(args.cases, args.seed)
    else:
        kinds, failures = fuzz(args.cases, args.seed)
    poison = ", unwritten rows poisoned" if args.poison else ""
    print(f"{args.cases} cases (seed {args.seed}{poison}): {dict(kinds)}; {len(failures)} failed")
    for line in failures[:20]:
        print(line.split("\n")[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())

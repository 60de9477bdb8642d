"""Shared by the kernel tests: random inputs on the test device, the per-dtype tolerance table, gradient
comparison."""

from __future__ import annotations

import torch

from pure_reasoner.kernels.expert_mlp.random_inputs import random_ids, random_mlp_inputs

__all__ = ["DEVICE", "DTYPES", "TOLERANCE", "as_oracle_input", "assert_outputs_and_grads", "mlp_inputs", "random_ids"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Oracles run in float64 on the same (upcast) inputs; these bound the kernel's own rounding.
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),  # GPU only: the interpreter's bf16 tl.dot is wrong
}
# bf16 is tested only on a GPU: the Triton interpreter's bf16 tl.dot is wrong.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, one_expert=None):
    """``random_mlp_inputs`` on DEVICE with gates in [0.1, 1.1) (no gate so small that it hides a wrong row)."""
    return random_mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, one_expert=one_expert,
                             gate_floor=0.1, device=DEVICE)


def as_oracle_input(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU leaf copy (ints: a CPU copy) for the loop oracles."""
    if not t.is_floating_point():
        return t.cpu()
    return t.detach().cpu().double().requires_grad_(t.requires_grad)


def assert_outputs_and_grads(tri, ref, tri_inputs, ref_inputs, names, dtype):
    """tri (kernel) vs ref (float64 oracle): values, then the gradient of every input for one random dy."""
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(tri.detach().cpu().double(), ref.detach(), **tol, msg="output")
    dy = torch.randn(ref.shape, dtype=torch.float64)
    tri_grads = torch.autograd.grad(tri, tri_inputs, dy.to(tri.device, tri.dtype), allow_unused=True)
    ref_grads = [None] * len(names)
    if ref.requires_grad:  # else nothing was routed and the oracle's output is a constant
        ref_grads = torch.autograd.grad(ref, ref_inputs, dy, allow_unused=True)
    for name, t, r, inp in zip(names, tri_grads, ref_grads, tri_inputs, strict=True):
        assert t is not None, f"no gradient for {name}"
        expected = torch.zeros(inp.shape, dtype=torch.float64) if r is None else r  # untouched by the oracle
        torch.testing.assert_close(t.cpu().double(), expected, **tol, msg=f"d{name}")

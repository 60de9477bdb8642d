"""Shared by the kernel tests: random inputs, the per-dtype tolerance table, gradient comparison."""

from __future__ import annotations

import torch

from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Oracles run in float64 on the same (upcast) inputs; these bound the kernel's own rounding.
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),  # GPU only: the interpreter's bf16 tl.dot is wrong
}
# bf16 is tested only on a GPU: the Triton interpreter's bf16 tl.dot is wrong.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def random_ids(num_tokens, num_experts, top_k, idle_share, one_expert=None) -> torch.Tensor:
    """[T, K] distinct experts per token (or all ``one_expert``), each slot idle with prob ``idle_share``."""
    if one_expert is not None:
        ids_TK = torch.full((num_tokens, top_k), one_expert)
    else:
        ids_TK = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    return torch.where(torch.rand(num_tokens, top_k) < idle_share, NOT_CONSULTED, ids_TK).reshape(num_tokens, top_k)


def mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, one_expert=None):
    """(x_TD, ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD) on DEVICE, float leaves requiring grad; gates fp32."""
    ids_TK = random_ids(num_tokens, num_experts, top_k, idle_share, one_expert)
    x_TD = torch.randn(num_tokens, dim)
    gates_TK = torch.rand(num_tokens, top_k) + 0.1
    weights = [torch.randn(num_experts, a, b) / a**0.5 for a, b in ((dim, width), (dim, width), (width, dim))]
    floats = [x_TD.to(dtype), gates_TK, *(w.to(dtype) for w in weights)]
    x_TD, gates_TK, w1, w3, w2 = (t.to(DEVICE).requires_grad_() for t in floats)
    return x_TD, ids_TK.to(DEVICE), gates_TK, w1, w3, w2


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

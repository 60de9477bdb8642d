"""Random routed inputs of the knowledge-expert MLP: the one generator the kernel tests and the fuzzer share.

Shapes: T tokens, K slots per token, D model dim, F expert width, E experts.
"""

from __future__ import annotations

import torch

from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED


def random_ids(num_tokens: int, num_experts: int, top_k: int, idle_share: float, one_expert: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """[T, K] int64: K distinct experts per token (or every slot ``one_expert``), each slot ``NOT_CONSULTED``
    with probability ``idle_share``."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if one_expert is not None:
        ids_TK = torch.full((num_tokens, top_k), one_expert)
    else:
        ids_TK = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
        ids_TK = ids_TK.reshape(num_tokens, top_k)
    idle_TK = torch.rand(num_tokens, top_k, generator=generator) < idle_share
    return torch.where(idle_TK, NOT_CONSULTED, ids_TK)


def random_mlp_inputs(num_tokens: int, dim: int, width: int, num_experts: int, top_k: int, idle_share: float,
                      dtype: torch.dtype, *, one_expert: int | None = None, gate_floor: float = 0.0,
                      device: str | torch.device = "cpu", generator: torch.Generator | None = None):
    """(x_TD, ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD) on ``device``: float leaves requiring grad.

    x and the weights are drawn in float64 for ``dtype=torch.float64``, else in float32, then cast to ``dtype``;
    weights scaled by 1/sqrt(fan-in). Gates are float32, uniform in [gate_floor, gate_floor + 1). ids as
    ``random_ids``.
    """
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    ids_TK = random_ids(num_tokens, num_experts, top_k, idle_share, one_expert, generator)
    x_TD = torch.randn(num_tokens, dim, dtype=draw, generator=generator)
    gates_TK = torch.rand(num_tokens, top_k, generator=generator) + gate_floor
    weights = [torch.randn(num_experts, a, b, dtype=draw, generator=generator) / a**0.5
               for a, b in ((dim, width), (dim, width), (width, dim))]
    floats = [x_TD.to(dtype), gates_TK, *(w.to(dtype) for w in weights)]
    x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD = (t.to(device).requires_grad_() for t in floats)
    return x_TD, ids_TK.to(device), gates_TK, w1_EDF, w3_EDF, w2_EFD

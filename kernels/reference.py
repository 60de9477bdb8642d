"""Oracles: obviously-right loops that the fast paths are tested against. Never fast, never clever.

Shapes: T tokens, K slots per token, D model dim, F expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knowledge_mlp_reference(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """Double loop over tokens and slots; differentiable in every input.

    Args and returns as ``kernels.torch_mlp.knowledge_mlp_torch``.
    """
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for k in range(expert_ids_TK.shape[1]):
            e = int(expert_ids_TK[t, k])
            if e < 0:
                continue
            h_F = F.silu(x_TD[t] @ w1_EDF[e]) * (x_TD[t] @ w3_EDF[e])
            y_D = y_D + gates_TK[t, k].to(x_TD.dtype) * (h_F @ w2_EFD[e])
        rows.append(y_D)
    return torch.stack(rows) if rows else torch.zeros_like(x_TD)

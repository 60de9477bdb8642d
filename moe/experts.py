"""Expert MLPs: the dense SwiGLU (reasoning expert, dense blocks) and the grouped knowledge experts.

Shape legend: T tokens, D model dim, F expert width, E experts, K top-k slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import Linear, knowledge_mlp


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: ``w2(silu(w1 x) * w3 x)`` (oneDNN GEMMs on CPU fp32, see ``kernels.onednn_linear``)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.w1 = Linear(d_model, width, bias=False)
        self.w3 = Linear(d_model, width, bias=False)
        self.w2 = Linear(width, d_model, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]."""
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as grouped ``[E, ...]`` weights; runs only the routed rows."""

    def __init__(self, d_model: int, width: int, num_experts: int, impl: str = "torch"):
        super().__init__()
        self.impl = impl
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, width, d_model))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
        """Sum over each token's consulted experts of gate * expert(x).

        Args:
            x_TD: [T, D]; expert_ids_TK: [T, K] (-1 = idle slot); gates_TK: [T, K].

        Returns:
            [T, D]
        """
        return knowledge_mlp(x_TD, expert_ids_TK, gates_TK, self.w1_EDF, self.w3_EDF, self.w2_EFD, impl=self.impl)

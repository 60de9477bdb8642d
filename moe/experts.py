"""Expert MLPs: the dense SwiGLU (reasoning expert, dense blocks) and the grouped knowledge experts.

Shape legend: T tokens, D model dim, F expert width, E experts, K top-k slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.kernels import Linear, knowledge_mlp


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: ``w2(silu(w1 x) * w3 x)`` (big CPU fp32 GEMMs on this machine's engine: ``kernels.Linear``)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.w1 = Linear(d_model, width, bias=False)
        self.w3 = Linear(d_model, width, bias=False)
        self.w2 = Linear(width, d_model, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]."""
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


def saved_row_bound(num_slots: int, row_share: float, min_rows: int) -> int:
    """How many routed rows keep activations for the backward: ``min(S, ceil(row_share * S) + min_rows)``.

    From shapes and config only, so it costs no host sync; rows past it are recomputed, never dropped.

    Args:
        num_slots: S = T*K.
        row_share: ``KnowledgeConfig.saved_row_share`` (headroom x target rate).
        min_rows: ``KnowledgeConfig.saved_rows_min``.
    """
    return min(num_slots, math.ceil(row_share * num_slots) + min_rows)


def overflow_rows(expert_ids_TK: torch.Tensor, max_rows: int) -> torch.Tensor:
    """0-d int64 on the ids' device: routed slots past ``max_rows`` (recomputed in the backward)."""
    return ((expert_ids_TK >= 0).sum() - max_rows).clamp(min=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as grouped ``[E, ...]`` weights; runs only the routed rows.

    ``saved_row_share``, ``min_saved_rows``: the saved-activation row bound (``saved_row_bound``); the
    defaults keep all T*K. ``deterministic``: combine in slot order; ``tf32``: the Triton path's fp32
    dots in TF32 (``kernels.knowledge_mlp``).
    """

    def __init__(self, d_model: int, width: int, num_experts: int, impl: str = "torch",
                 saved_row_share: float = 1.0, min_saved_rows: int = 0, deterministic: bool = False,
                 tf32: bool = False):
        super().__init__()
        self.impl, self.tf32 = impl, tf32
        self.saved_row_share, self.min_saved_rows, self.deterministic = saved_row_share, min_saved_rows, deterministic
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
        max_rows = saved_row_bound(expert_ids_TK.numel(), self.saved_row_share, self.min_saved_rows)
        return knowledge_mlp(x_TD, expert_ids_TK, gates_TK, self.w1_EDF, self.w3_EDF, self.w2_EFD, impl=self.impl,
                             max_rows=max_rows, deterministic=self.deterministic, tf32=self.tf32)

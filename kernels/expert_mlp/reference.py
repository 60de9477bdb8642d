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

    Args and returns as ``kernels.expert_mlp.torch_mlp.knowledge_mlp_torch``.
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


def _expert_of_row(expert_ids_TK: torch.Tensor, slot_order_S: torch.Tensor, r: int) -> tuple[int, int, int]:
    """(slot, token, expert) of sorted row r."""
    slot = int(slot_order_S[r])
    return slot, slot // expert_ids_TK.shape[1], int(expert_ids_TK.reshape(-1)[slot])


def gather_swiglu_reference(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
) -> torch.Tensor:
    """Oracle of the gather + up/gate + SwiGLU op: a loop over sorted rows.

    Args:
        x_TD: [T, D]; expert_ids_TK: [T, K]; slot_order_S: [S] (``routing_metadata``); w1_EDF, w3_EDF: [E, D, F].

    Returns:
        h_SF: [S, F], zero on rows of idle slots.
    """
    rows = []
    for r in range(slot_order_S.numel()):
        _, t, e = _expert_of_row(expert_ids_TK, slot_order_S, r)
        if e < 0:
            rows.append(x_TD.new_zeros(w1_EDF.shape[2]))
        else:
            rows.append(F.silu(x_TD[t] @ w1_EDF[e]) * (x_TD[t] @ w3_EDF[e]))
    return torch.stack(rows) if rows else x_TD.new_zeros(0, w1_EDF.shape[2])


def down_scatter_reference(
    h_SF: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """Oracle of the down projection + gate-weighted scatter-add: a loop over sorted rows.

    Args:
        h_SF: [S, F] in sorted-row order; expert_ids_TK, gates_TK: [T, K]; slot_order_S: [S]; w2_EFD: [E, F, D].

    Returns:
        y_TD: [T, D].
    """
    num_tokens = expert_ids_TK.shape[0]
    y = [h_SF.new_zeros(w2_EFD.shape[2]) for _ in range(num_tokens)]
    for r in range(slot_order_S.numel()):
        slot, t, e = _expert_of_row(expert_ids_TK, slot_order_S, r)
        if e >= 0:
            y[t] = y[t] + gates_TK.reshape(-1)[slot].to(h_SF.dtype) * (h_SF[r] @ w2_EFD[e])
    return torch.stack(y) if y else h_SF.new_zeros(0, w2_EFD.shape[2])


def combine_rows_reference(y_RD: torch.Tensor, slot_R: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Oracle of the deterministic combine: per token, add its slots' rows in slot order k = 0..K-1.

    Args:
        y_RD: [R, D] rows; slot_R: [R] flat slot (t*K + k) of each row; num_tokens: T; top_k: K.

    Returns:
        y_TD: [T, D], y's dtype.
    """
    row_of_slot = {int(s): r for r, s in enumerate(slot_R)}
    y = [y_RD.new_zeros(y_RD.shape[1]) for _ in range(num_tokens)]
    for t in range(num_tokens):
        for k in range(top_k):
            r = row_of_slot.get(t * top_k + k)
            if r is not None:
                y[t] = y[t] + y_RD[r]
    return torch.stack(y) if y else y_RD.new_zeros(0, y_RD.shape[1])

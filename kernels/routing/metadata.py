"""Routing metadata: group (token, slot) pairs by knowledge expert without a host sync.

Shapes: T tokens, K slots per token, S = T*K slots, E experts.

A slot whose expert id is ``NOT_CONSULTED`` (-1) did not consult knowledge. Sorting by expert with
the sentinel mapped to E puts every routed slot first, grouped by expert, and every idle slot last,
so rows ``[0, num_routed)`` of the sorted order are exactly the work to do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NOT_CONSULTED = -1


class RoutingMeta(NamedTuple):
    """Where each slot goes. All int64 on the ids' device unless noted.

    slot_order_S: flat slot index (t*K + k) in sorted position; routed slots first, by expert.
    token_order_S: token index of each sorted slot (``slot_order_S // K``).
    inverse_S: sorted position of each flat slot (``inverse_S[slot_order_S] == arange(S)``).
    counts_E: routed slots per expert.
    offsets_E: int32 end offset of each expert's group (``cumsum(counts_E)``), for grouped GEMMs.
    num_routed: 0-d, routed slots in total (``offsets_E[-1]``).
    """

    slot_order_S: torch.Tensor
    token_order_S: torch.Tensor
    inverse_S: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    num_routed: torch.Tensor


def check_ids(expert_ids_TK: torch.Tensor, num_experts: int) -> None:
    if expert_ids_TK.dim() != 2:
        raise ValueError(f"expert_ids_TK must be 2-D [T, K], got shape {tuple(expert_ids_TK.shape)}")
    if expert_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids_TK must be int32 or int64, got {expert_ids_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def check_sorted_rows(slot_order_S: torch.Tensor, offsets_E: torch.Tensor) -> None:
    """ValueError unless the sorted-row metadata has ``RoutingMeta``'s dtypes (the Triton kernels read it raw)."""
    if slot_order_S.dtype != torch.int64 or offsets_E.dtype != torch.int32:
        raise ValueError(f"slot_order_S must be int64 and offsets_E int32, got {slot_order_S.dtype}, {offsets_E.dtype}")


def routing_metadata(expert_ids_TK: torch.Tensor, num_experts: int) -> RoutingMeta:
    """Sort slots by expert; count and offset each group. No host sync.

    Args:
        expert_ids_TK: [T, K] int, expert of each slot in ``[0, E)``, or ``NOT_CONSULTED``.
        num_experts: E.

    Returns:
        RoutingMeta (see its docstring).
    """
    check_ids(expert_ids_TK, num_experts)
    num_slots_per_token = expert_ids_TK.shape[1]
    ids_S = expert_ids_TK.reshape(-1).long()
    # The sentinel sorts after every real expert; a stable sort keeps token order inside a group,
    # which makes the scatter-add order (and so the result) deterministic.
    key_S = torch.where(ids_S < 0, num_experts, ids_S)
    _, slot_order_S = torch.sort(key_S, stable=True)
    # scatter_add rather than bincount: bincount reads max() back to the host on CUDA.
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_S.device)
    counts_E1.scatter_add_(0, key_S, torch.ones_like(key_S))
    counts_E = counts_E1[:num_experts]
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    inverse_S = torch.empty_like(slot_order_S)
    inverse_S[slot_order_S] = torch.arange(slot_order_S.numel(), device=ids_S.device)
    return RoutingMeta(
        slot_order_S=slot_order_S,
        token_order_S=slot_order_S // num_slots_per_token,
        inverse_S=inverse_S,
        counts_E=counts_E,
        offsets_E=offsets_E,
        num_routed=counts_E.sum(),
    )


def expert_row_ranges(offsets_E: torch.Tensor):
    """(expert, start, end) of every expert's rows in the sorted order, empty experts included.

    Reads the offsets on the host: for CPU paths (a load from host memory) and loop fallbacks only.
    """
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        yield e, start, end
        start = end

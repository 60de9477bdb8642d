"""The routing oracle: the metadata of ``metadata.routing_metadata`` built with Python loops over slots.

Shapes: T tokens, K slots per token, E experts.
"""

from __future__ import annotations

import torch

from pure_reasoner.kernels.routing.metadata import RoutingMeta, check_ids


def routing_metadata_reference(expert_ids_TK: torch.Tensor, num_experts: int) -> RoutingMeta:
    """Oracle: the same metadata built with Python loops over slots."""
    check_ids(expert_ids_TK, num_experts)
    num_tokens, num_slots_per_token = expert_ids_TK.shape
    groups: list[list[int]] = [[] for _ in range(num_experts + 1)]
    for t in range(num_tokens):
        for k in range(num_slots_per_token):
            e = int(expert_ids_TK[t, k])
            groups[num_experts if e < 0 else e].append(t * num_slots_per_token + k)
    order = [s for g in groups for s in g]
    inverse = [0] * len(order)
    for pos, s in enumerate(order):
        inverse[s] = pos
    counts = [len(g) for g in groups[:num_experts]]
    offsets, running = [], 0
    for c in counts:
        running += c
        offsets.append(running)
    device = expert_ids_TK.device
    slot_order_S = torch.tensor(order, dtype=torch.int64, device=device)
    return RoutingMeta(
        slot_order_S=slot_order_S,
        token_order_S=slot_order_S // num_slots_per_token,
        inverse_S=torch.tensor(inverse, dtype=torch.int64, device=device),
        counts_E=torch.tensor(counts, dtype=torch.int64, device=device),
        offsets_E=torch.tensor(offsets, dtype=torch.int32, device=device),
        num_routed=torch.tensor(running, dtype=torch.int64, device=device),
    )

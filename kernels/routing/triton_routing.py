"""Routing metadata in Triton: count and place every slot by expert, no sort and no host sync.

Shapes: T tokens, K slots per token, S = T*K slots, E experts, B blocks of BLOCK_S slots,
P = E + 1 buckets (the last for ``NOT_CONSULTED``) padded to a power of two.

1. ``_routing_count_kernel``: each block histograms its slots' buckets into counts_BP.
2. a device-side exclusive scan (``torch.cumsum``) gives where each bucket's group starts and where
   each block's share of it starts;
3. ``_routing_place_kernel``: a slot's sorted position = its block's start in its bucket + its rank
   among the block's earlier slots of the same bucket (a cumsum over the one-hot tile).
Ranks follow slot order, so the result equals the stable sort of ``kernels.routing.metadata`` bit for bit.
The one-hot tile is BLOCK_S x P, so BLOCK_S shrinks as E grows.

An id outside ``[NOT_CONSULTED, E)`` would land in the idle bucket or a padding bucket and be silently
dropped; with ``debug`` (or ``TRITON_DEBUG=1``) the count kernel checks every id with a device assert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pure_reasoner.kernels.backends import check_triton
from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED, RoutingMeta, check_ids
from pure_reasoner.kernels.triton_schedule import launch

_TILE_ELEMENTS = 8192  # BLOCK_S * P: one int32 one-hot tile per program
NOT_CONSULTED_ID = tl.constexpr(NOT_CONSULTED)


@triton.jit
def _routing_count_kernel(ids_ptr, counts_ptr, num_slots, num_experts, BLOCK_S: tl.constexpr, P: tl.constexpr):
    block = tl.program_id(0)
    slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
    # Compiled in only in Triton's debug mode (the ``debug`` launch option or TRITON_DEBUG=1).
    tl.device_assert((ids >= NOT_CONSULTED_ID) & (ids < num_experts), "expert id out of [-1, num_experts)")
    # Idle slots go to bucket E; lanes past the end to P, which matches no bucket.
    bucket = tl.where(slots < num_slots, tl.where(ids < 0, num_experts, ids), P)
    onehot = (bucket[:, None] == tl.arange(0, P)[None, :]).to(tl.int32)
    tl.store(counts_ptr + block * P + tl.arange(0, P), tl.sum(onehot, axis=0))


@triton.jit
def _routing_place_kernel(
    ids_ptr, starts_ptr, slot_order_ptr, token_order_ptr, inverse_ptr,
    num_slots, num_experts, num_slots_per_token, BLOCK_S: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=in_range, other=-1)
    bucket = tl.where(in_range, tl.where(ids < 0, num_experts, ids), P)
    onehot = (bucket[:, None] == tl.arange(0, P)[None, :]).to(tl.int32)
    start_P = tl.load(starts_ptr + block * P + tl.arange(0, P))
    # Inclusive cumsum down the tile: rank (from 1) of each slot among this block's slots in its bucket.
    position = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1 + start_P[None, :]), axis=1).to(tl.int64)
    slots64 = slots.to(tl.int64)
    tl.store(slot_order_ptr + position, slots64, mask=in_range)
    tl.store(token_order_ptr + position, slots64 // num_slots_per_token, mask=in_range)
    tl.store(inverse_ptr + slots64, position, mask=in_range)


def _block_size(num_buckets_padded: int) -> int:
    return max(16, min(256, _TILE_ELEMENTS // num_buckets_padded))


def _routing_metadata_launch(expert_ids_TK: torch.Tensor, num_experts: int, debug: bool) -> tuple[torch.Tensor, ...]:
    check_ids(expert_ids_TK, num_experts)
    check_triton(expert_ids_TK)
    ids_S = expert_ids_TK.reshape(-1).contiguous()
    num_slots, device = ids_S.numel(), ids_S.device
    num_buckets_padded = triton.next_power_of_2(num_experts + 1)
    block_s = _block_size(num_buckets_padded)
    num_blocks = triton.cdiv(num_slots, block_s)
    counts_BP = torch.empty(num_blocks, num_buckets_padded, dtype=torch.int32, device=device)
    grid = (num_blocks,)
    if num_blocks:
        launch(_routing_count_kernel, grid, ids_S, counts_BP, num_slots, num_experts, deterministic=False,
               BLOCK_S=block_s, P=num_buckets_padded, **({"debug": True} if debug else {}))
    bucket_P = counts_BP.sum(0, dtype=torch.int64)
    group_start_P = torch.cumsum(bucket_P, 0) - bucket_P
    starts_BP = (torch.cumsum(counts_BP, 0, dtype=torch.int64) - counts_BP + group_start_P).to(torch.int32)

    slot_order_S = torch.empty(num_slots, dtype=torch.int64, device=device)
    token_order_S = torch.empty_like(slot_order_S)
    inverse_S = torch.empty_like(slot_order_S)
    if num_blocks:
        launch(
            _routing_place_kernel, grid, ids_S, starts_BP, slot_order_S, token_order_S, inverse_S,
            num_slots, num_experts, expert_ids_TK.shape[1], deterministic=False, BLOCK_S=block_s, P=num_buckets_padded,
        )  # fmt: skip
    counts_E = bucket_P[:num_experts].clone()
    return slot_order_S, token_order_S, inverse_S, counts_E, torch.cumsum(counts_E, 0).to(torch.int32)


@torch.library.custom_op("pure_reasoner::triton_routing", mutates_args=())
def _routing_op(
    expert_ids_TK: torch.Tensor, num_experts: int, debug: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _routing_metadata_launch(expert_ids_TK, num_experts, debug)


@_routing_op.register_fake
def _(expert_ids_TK, num_experts, debug):
    num_slots = expert_ids_TK.shape[0] * expert_ids_TK.shape[1]
    slots = [expert_ids_TK.new_empty(num_slots, dtype=torch.int64) for _ in range(3)]
    counts_E = expert_ids_TK.new_empty(num_experts, dtype=torch.int64)
    return *slots, counts_E, expert_ids_TK.new_empty(num_experts, dtype=torch.int32)


def routing_metadata_triton(expert_ids_TK: torch.Tensor, num_experts: int, debug: bool = False) -> RoutingMeta:
    """Same contract as ``kernels.routing.metadata.routing_metadata`` (and equal to it exactly), built in Triton.

    Args:
        expert_ids_TK: [T, K] int32/int64 expert ids in ``[0, E)`` or ``NOT_CONSULTED``; CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        num_experts: E.
        debug: check on the device that every id is in ``[NOT_CONSULTED, E)`` (a device-side assert;
            ``TRITON_DEBUG=1`` turns it on for every launch).

    Returns:
        RoutingMeta.
    """
    check_ids(expert_ids_TK, num_experts)
    slot_order_S, token_order_S, inverse_S, counts_E, offsets_E = _routing_op(expert_ids_TK, num_experts, debug)
    return RoutingMeta(slot_order_S, token_order_S, inverse_S, counts_E, offsets_E, num_routed=counts_E.sum())

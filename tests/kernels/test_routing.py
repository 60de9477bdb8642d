"""Routing metadata: invariants, and agreement with the loop oracle."""

import pytest
import torch

from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED, routing_metadata
from pure_reasoner.kernels.routing.reference import routing_metadata_reference


def _random_ids(num_tokens: int, top_k: int, num_experts: int, idle_share: float) -> torch.Tensor:
    ids_TK = torch.randint(0, num_experts, (num_tokens, top_k))
    return torch.where(torch.rand(num_tokens, top_k) < idle_share, NOT_CONSULTED, ids_TK)


CASES = [
    pytest.param(1, 1, 1, 0.0, id="T=1-E=1"),
    pytest.param(63, 2, 7, 0.5, id="T=63-prime-E"),
    pytest.param(64, 4, 4, 0.0, id="K=E"),
    pytest.param(50, 2, 8, 1.0, id="no-token-consults"),
    pytest.param(128, 2, 16, 0.9, id="rate-1/10"),
]


@pytest.mark.parametrize("num_tokens,top_k,num_experts,idle_share", CASES)
def test_invariants_and_oracle(num_tokens, top_k, num_experts, idle_share):
    ids_TK = _random_ids(num_tokens, top_k, num_experts, idle_share)
    meta = routing_metadata(ids_TK, num_experts)
    ref = routing_metadata_reference(ids_TK, num_experts)
    for name in meta._fields:
        torch.testing.assert_close(getattr(meta, name), getattr(ref, name), rtol=0, atol=0, msg=name)

    flat_S = ids_TK.reshape(-1)
    num_slots = flat_S.numel()
    assert int(meta.counts_E.sum()) == int((flat_S >= 0).sum()) == int(meta.num_routed)
    assert torch.equal(meta.offsets_E.long(), torch.cumsum(meta.counts_E, 0))
    assert torch.equal(meta.slot_order_S[meta.inverse_S], torch.arange(num_slots))
    assert torch.equal(meta.inverse_S[meta.slot_order_S], torch.arange(num_slots))
    sorted_ids_S = flat_S[meta.slot_order_S]
    routed = int(meta.num_routed)
    assert bool((sorted_ids_S[:routed] >= 0).all()) and bool((sorted_ids_S[routed:] < 0).all())
    assert bool((sorted_ids_S[:routed].diff() >= 0).all())
    assert torch.equal(meta.token_order_S, meta.slot_order_S // top_k)


def test_all_tokens_to_one_expert():
    ids_TK = torch.full((33, 1), 2)
    meta = routing_metadata(ids_TK, 5)
    assert meta.counts_E.tolist() == [0, 0, 33, 0, 0]
    assert meta.offsets_E.tolist() == [0, 0, 33, 33, 33]


def test_runs_on_meta_device_without_reading_values():
    """The meta device has no values: any host read (.item(), .tolist()) would raise."""
    meta = routing_metadata(torch.empty(16, 2, dtype=torch.int64, device="meta"), 4)
    assert meta.counts_E.device.type == "meta" and meta.slot_order_S.shape == (32,)


@pytest.mark.parametrize(
    "ids,num_experts,match",
    [
        (torch.zeros(4, dtype=torch.int64), 2, "2-D"),
        (torch.zeros(4, 2), 2, "int32 or int64"),
        (torch.zeros(4, 2, dtype=torch.int64), 0, "num_experts"),
    ],
)
def test_bad_input(ids, num_experts, match):
    with pytest.raises(ValueError, match=match):
        routing_metadata(ids, num_experts)

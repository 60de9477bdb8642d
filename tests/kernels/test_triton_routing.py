"""Triton routing metadata: equal, field by field, to the loop oracle and to the torch sort."""

import pytest
import torch
from kernel_inputs import DEVICE, random_ids

from pure_reasoner.kernels.routing.metadata import routing_metadata
from pure_reasoner.kernels.routing.reference import routing_metadata_reference
from pure_reasoner.kernels.routing.triton_routing import routing_metadata_triton

CASES = [
    pytest.param(1, 1, 1, 0.0, None, id="T=1-E=1"),
    pytest.param(63, 2, 7, 0.5, None, id="T=63-prime-E"),
    pytest.param(64, 4, 4, 0.0, None, id="K=E"),
    pytest.param(50, 2, 8, 1.0, None, id="no-token-consults"),
    pytest.param(33, 1, 5, 0.0, 2, id="all-tokens-to-one-expert"),
    pytest.param(300, 2, 16, 0.9, None, id="rate-1/10-several-blocks"),
    pytest.param(100, 3, 130, 0.2, None, id="E=130-small-slot-blocks"),
]


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_tokens,top_k,num_experts,idle_share,one_expert", CASES)
def test_equals_oracle(num_tokens, top_k, num_experts, idle_share, one_expert, id_dtype, poison):
    ids_TK = random_ids(num_tokens, num_experts, top_k, idle_share, one_expert).to(id_dtype)
    tri = routing_metadata_triton(ids_TK.to(DEVICE), num_experts)
    ref = routing_metadata_reference(ids_TK, num_experts)
    fast = routing_metadata(ids_TK, num_experts)
    for name in ref._fields:
        torch.testing.assert_close(getattr(tri, name).cpu(), getattr(ref, name), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=0, atol=0, msg=name)


def test_bad_input():
    with pytest.raises(ValueError, match="num_experts"):
        routing_metadata_triton(torch.zeros(4, 2, dtype=torch.int64, device=DEVICE), 0)
    with pytest.raises(ValueError, match="2-D"):
        routing_metadata_triton(torch.zeros(4, dtype=torch.int64, device=DEVICE), 2)

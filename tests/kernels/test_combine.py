"""The deterministic combine: a token's slots summed in slot order, whatever order the routing gives
the rows; bit for bit against the loop oracle, on every implementation that runs here.

Bitwise equality run to run says nothing on a CPU, where every path is sequential; what these tests pin
down is the order itself: equal to the fixed order k = 0..K-1, and unchanged when the rows are permuted.
"""

import pytest
import torch
from kernel_inputs import DEVICE

from pure_reasoner.kernels import knowledge_mlp
from pure_reasoner.kernels.expert_mlp.combine import combine_rows
from pure_reasoner.kernels.expert_mlp.random_inputs import random_ids
from pure_reasoner.kernels.expert_mlp.reference import combine_rows_reference, knowledge_mlp_reference


def _rows(num_tokens, top_k, dim, idle_share, seed):
    """Random rows for a random subset of the slots, in a random row order: (y_RD, slot_R)."""
    gen = torch.Generator().manual_seed(seed)
    slot_R = torch.randperm(num_tokens * top_k, generator=gen)
    slot_R = slot_R[torch.rand(slot_R.shape, generator=gen) >= idle_share]
    # Magnitudes spread over 2^±8, so that the order of the additions shows in the low bits.
    scale_R1 = 2.0 ** torch.randint(-8, 9, (slot_R.numel(), 1), generator=gen)
    y_RD = torch.randn(slot_R.numel(), dim, generator=gen) * scale_R1
    return y_RD, slot_R


# (T, K, D, idle share): each names the edge it targets.
CASES = [
    pytest.param(1, 1, 8, 0.0, id="T=1-K=1"),
    pytest.param(33, 4, 20, 0.0, id="every-slot-routed"),
    pytest.param(40, 3, 17, 0.5, id="half-idle"),
    pytest.param(12, 5, 8, 1.0, id="nothing-routed"),
]


@pytest.mark.parametrize("num_tokens,top_k,dim,idle_share", CASES)
def test_deterministic_combine_is_slot_order_bit_for_bit(num_tokens, top_k, dim, idle_share):
    y_RD, slot_R = _rows(num_tokens, top_k, dim, idle_share, seed=0)
    expected = combine_rows_reference(y_RD, slot_R, num_tokens, top_k)
    assert torch.equal(combine_rows(y_RD, slot_R, num_tokens, top_k, deterministic=True), expected)
    for seed in range(5):  # the same rows in other orders, as another routing of the batch would sort them
        perm_R = torch.randperm(slot_R.numel(), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(combine_rows(y_RD[perm_R], slot_R[perm_R], num_tokens, top_k, deterministic=True), expected)


def test_row_order_matters_to_a_scatter_add():
    """The power of the test above: on these rows the scatter-add's result does depend on the row order."""
    y_RD, slot_R = _rows(33, 4, 20, 0.0, seed=0)
    results = [combine_rows(y_RD[p], slot_R[p], 33, 4, deterministic=False)
               for p in (torch.arange(slot_R.numel()), torch.arange(slot_R.numel()).flip(0))]
    assert not torch.equal(*results)


def _exact_inputs(num_tokens, dim, width, num_experts, top_k, seed):
    """Inputs whose expert outputs are exact in fp32 before the gate, so only the gate products and the
    combine round: small integers, and a1 >= 2*2*D = 32 where silu(a1) == a1 in fp32 (sigmoid rounds to 1).
    Each slot's contribution is then one rounding of gate * integer; the combine's order alone sets the bits."""
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randint(2, 4, (num_tokens, dim), generator=gen).float()
    w1 = torch.randint(2, 4, (num_experts, dim, width), generator=gen).float()
    w3 = torch.randint(-2, 3, (num_experts, dim, width), generator=gen).float()
    w2 = torch.randint(-2, 3, (num_experts, width, dim), generator=gen).float()
    ids_TK = random_ids(num_tokens, num_experts, top_k, 0.2, generator=gen)
    gates_TK = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return x_TD, ids_TK, gates_TK, w1, w3, w2


def _relabelled(inputs, seed):
    """The same function with the experts renumbered: the routing sorts each token's rows differently."""
    x_TD, ids_TK, gates_TK, w1, w3, w2 = inputs
    new_of_old = torch.randperm(w1.shape[0], generator=torch.Generator().manual_seed(seed))
    old_of_new = torch.argsort(new_of_old)
    ids_TK = torch.where(ids_TK >= 0, new_of_old[ids_TK.clamp(min=0)], -1)
    return x_TD, ids_TK, gates_TK, w1[old_of_new], w3[old_of_new], w2[old_of_new]


# (impl, extra kwargs): the torch path compact and masked with a saved-row bound below the routed rows.
IMPLS = [
    pytest.param("torch", dict(compact=True), id="torch-compact"),
    pytest.param("torch", dict(compact=False, max_rows=20), id="torch-masked-bounded"),
    pytest.param("triton", dict(max_rows=20), id="triton-bounded"),
]


def _run(impl, kwargs, inputs):
    if impl == "triton":
        return knowledge_mlp(*(t.to(DEVICE) for t in inputs), impl="triton", deterministic=True, **kwargs).cpu()
    from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch

    return knowledge_mlp_torch(*inputs, deterministic=True, **kwargs)


@pytest.mark.parametrize("impl,kwargs", IMPLS)
def test_knowledge_mlp_deterministic_combine(impl, kwargs):
    """Equal bit for bit to the loop oracle (slot order k = 0..K-1), and unchanged when the experts are
    renumbered; K = 4 because with K = 2 any order gives the same bits (a + b == b + a)."""
    inputs = _exact_inputs(48, 8, 4, 6, 4, seed=0)
    expected = knowledge_mlp_reference(*inputs)
    assert torch.equal(_run(impl, kwargs, inputs), expected)
    for seed in range(3):
        assert torch.equal(_run(impl, kwargs, _relabelled(inputs, seed)), expected)


def test_exact_inputs_are_order_sensitive():
    """The power of the test above: on these inputs a scatter-add in sorted-row order gives other bits."""
    inputs = _exact_inputs(48, 8, 4, 6, 4, seed=0)
    assert not torch.equal(knowledge_mlp(*inputs, impl="torch", deterministic=False), knowledge_mlp_reference(*inputs))

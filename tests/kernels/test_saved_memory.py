"""What the knowledge path keeps for its backward follows the routing, not T*K.

Saved bytes are measured with ``torch.autograd.graph.saved_tensors_hooks``: every storage a saved tensor
lives in, counted once and whole (a saved view of a [T*K, F] buffer costs the buffer). The path's own
inputs (x, gates, weights) are left out: the caller holds those anyway (x is the reasoning expert's
input too), so they are not memory the knowledge path adds.
"""

import pytest
import torch
from kernel_inputs import DEVICE

from pure_reasoner.kernels import knowledge_mlp
from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch
from pure_reasoner.moe import KnowledgeConfig
from pure_reasoner.moe.experts import overflow_rows, saved_row_bound

NUM_TOKENS, DIM, WIDTH, NUM_EXPERTS, TOP_K = 512, 32, 64, 8, 2


def saved_bytes(fn, inputs) -> int:
    """Bytes of the storages ``fn()`` saves for backward, less those of ``inputs``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    owned = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in storages.items() if ptr not in owned)


def _inputs(rate: float):
    """Routing in which exactly ``rate`` of the tokens consult (both slots), as the gate mechanism does."""
    gen = torch.Generator().manual_seed(0)
    ids_TK = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:TOP_K] for _ in range(NUM_TOKENS)])
    consults_T = torch.randperm(NUM_TOKENS, generator=gen) < int(rate * NUM_TOKENS)
    ids_TK = torch.where(consults_T.unsqueeze(1), ids_TK, -1)
    x_TD = torch.randn(NUM_TOKENS, DIM, generator=gen)
    gates_TK = torch.rand(NUM_TOKENS, TOP_K, generator=gen)
    weights = [torch.randn(NUM_EXPERTS, a, b, generator=gen) / a**0.5 for a, b in ((DIM, WIDTH),) * 2 + ((WIDTH, DIM),)]
    floats = [t.to(DEVICE).requires_grad_() for t in (x_TD, gates_TK, *weights)]
    return floats[0], ids_TK.to(DEVICE), *floats[1:]


def _path_saved_bytes(path: str, rate: float) -> int:
    """Saved bytes of the knowledge MLP at consult ``rate``, with the bound the layer derives from a
    config whose target is that rate (default headroom and floor)."""
    kcfg = KnowledgeConfig(num_experts=NUM_EXPERTS, expert_width=WIDTH, top_k=TOP_K, consult_rate=rate)
    inputs = _inputs(rate)
    max_rows = saved_row_bound(inputs[1].numel(), kcfg.saved_row_share, kcfg.saved_rows_min)
    if path == "triton":
        return saved_bytes(lambda: knowledge_mlp(*inputs, impl="triton", max_rows=max_rows), inputs)
    compact = path == "torch-compact"
    return saved_bytes(lambda: knowledge_mlp_torch(*inputs, compact=compact, max_rows=max_rows), inputs)


@pytest.mark.parametrize("path", ["torch-masked", "triton", "torch-compact"])
def test_saved_bytes_follow_the_consult_rate(path):
    """At consult rate 1/8 the path keeps <= 0.3x what it keeps at rate 1 (the bound is 1.5 x 1/8 of
    the 1024 slots + 64 = 256 rows of a1 and a3; the slot order, 8 bytes a slot, stays)."""
    full, eighth = _path_saved_bytes(path, 1.0), _path_saved_bytes(path, 0.125)
    assert full >= 2 * NUM_TOKENS * TOP_K * WIDTH * 4  # a1 and a3 of every slot: the measurement sees them
    assert eighth <= 0.3 * full, (eighth, full, eighth / full)


def test_row_bound_and_overflow_count():
    """Hand-worked cases of ``ceil(share * S) + floor``, capped at S; the overflow is the routed rows past it."""
    assert saved_row_bound(1024, 0.1875, 64) == 256
    assert saved_row_bound(1000, 0.1875, 64) == 252  # ceil(187.5) = 188
    assert saved_row_bound(100, 0.1875, 64) == 83
    assert saved_row_bound(10, 0.1875, 64) == 10  # small batches keep everything
    assert saved_row_bound(64, 1.5, 64) == 64  # rate 1 ('always'): all T*K
    ids_TK = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 0], [1, 2]])  # 7 routed
    assert [int(overflow_rows(ids_TK, bound)) for bound in (4, 7, 9)] == [3, 0, 0]


def test_layer_past_the_bound_is_exact_and_counted():
    """A layer whose router consults far more than its target (the null mechanism at init routes about
    half the slots, against a bound of 1/8 of them): the rows past the bound are recomputed, not dropped,
    so output and gradients equal the loop oracle's, and the stats count them."""
    from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
    from pure_reasoner.moe import MoEConfig, PureReasonerMoE

    kcfg = KnowledgeConfig(num_experts=4, expert_width=48, top_k=2, mechanism="null", num_null_experts=4,
                           consult_rate=0.125, saved_rows_factor=1.0, saved_rows_min=0, impl="triton")
    layer = PureReasonerMoE(MoEConfig(d_model=32, reasoning_width=None, knowledge=kcfg)).to(DEVICE).eval()
    layer.init_weights(std=0.3, out_std=0.3)
    x_TD = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    y_TD, stats = layer(x_TD)
    routing = layer.router(x_TD)
    routed = int((routing.expert_ids_TK >= 0).sum())
    assert routed > 16, routed  # 128 slots, bound ceil(0.125 * 128) = 16
    assert int(stats.overflow_rows) == routed - 16
    e = layer.experts
    ref_TD = knowledge_mlp_reference(x_TD, routing.expert_ids_TK, routing.gates_TK, e.w1_EDF, e.w3_EDF, e.w2_EFD)
    torch.testing.assert_close(y_TD, ref_TD, rtol=1e-4, atol=1e-5)
    params = [x_TD, e.w1_EDF, e.w3_EDF, e.w2_EFD]
    dy_TD = torch.randn_like(y_TD)
    for name, ours, ref in zip("x w1 w3 w2".split(), torch.autograd.grad(y_TD, params, dy_TD),
                               torch.autograd.grad(ref_TD, params, dy_TD), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=name)

"""The Triton knowledge path through the ``impl`` seam, end to end, against the loop oracle.

Runs under Triton's CPU interpreter when there is no GPU (see conftest.py).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import DEVICE, DTYPES, as_oracle_input, assert_outputs_and_grads, mlp_inputs

from pure_reasoner.kernels import knowledge_mlp
from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference

NAMES = ["x", "gates", "w1", "w3", "w2"]

# (T, D, F, E, K, idle share, one expert): each names the edge it targets.
CASES = [
    pytest.param(1, 32, 48, 4, 2, 0.0, None, id="T=1"),
    pytest.param(20, 32, 48, 4, 2, 1.0, None, id="no-token-consults"),
    pytest.param(40, 32, 48, 5, 1, 0.0, 3, id="all-tokens-to-one-expert"),
    pytest.param(24, 32, 48, 4, 4, 0.3, None, id="K=E"),
    pytest.param(45, 32, 48, 7, 2, 0.4, None, id="prime-E"),
    pytest.param(33, 40, 72, 5, 2, 0.2, None, id="non-pow2-D-F"),
    pytest.param(5, 32, 48, 3, 2, 0.0, None, id="T-below-row-block"),
    pytest.param(10, 16, 32, 70, 2, 0.2, None, id="E-above-T*K-empty-experts"),
]


def _check(inputs, dtype):
    tri = knowledge_mlp(*inputs, impl="triton")
    floats = [inputs[0], *inputs[2:]]
    ref_floats = [as_oracle_input(t) for t in floats]
    ref = knowledge_mlp_reference(ref_floats[0], inputs[1].cpu(), *ref_floats[1:])
    assert_outputs_and_grads(tri, ref, floats, ref_floats, NAMES, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,dim,width,num_experts,top_k,idle_share,one_expert", CASES)
def test_matches_reference(num_tokens, dim, width, num_experts, top_k, idle_share, one_expert, dtype, poison):
    _check(mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, one_expert), dtype)


@settings(max_examples=10, deadline=None)  # ~3 s an example under the interpreter
@given(
    num_tokens=st.integers(1, 40),
    dim=st.integers(1, 70),
    width=st.integers(1, 70),
    num_experts=st.integers(1, 12),
    top_k=st.integers(1, 4),
    idle_share=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_and_routings(num_tokens, dim, width, num_experts, top_k, idle_share, seed):
    torch.manual_seed(seed)
    inputs = mlp_inputs(num_tokens, dim, width, num_experts, min(top_k, num_experts), idle_share, torch.float32)
    _check(inputs, torch.float32)


def test_compiles_without_graph_breaks():
    """Under torch.compile the path is opaque custom ops with fake kernels: one graph, fwd and bwd."""
    inputs = mlp_inputs(12, 24, 40, 4, 2, 0.3, torch.float32)
    compiled = torch.compile(lambda *a: knowledge_mlp(*a, impl="triton"), backend="aot_eager", fullgraph=True)
    y = compiled(*inputs)
    y_eager = knowledge_mlp(*inputs, impl="triton")
    torch.testing.assert_close(y, y_eager)
    floats = [inputs[0], *inputs[2:]]
    dy = torch.randn_like(y)
    grads, grads_eager = torch.autograd.grad(y, floats, dy), torch.autograd.grad(y_eager, floats, dy)
    for name, g, g_eager in zip(NAMES, grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager, msg=name)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = [t.detach().cpu() for t in mlp_inputs(4, 16, 16, 2, 1, 0.0, torch.float32)]
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        knowledge_mlp(*inputs, impl="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bf16 check only applies on CPU")
def test_interpreter_rejects_bf16():
    inputs = mlp_inputs(4, 16, 16, 2, 1, 0.0, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        knowledge_mlp(*inputs, impl="triton")


@pytest.mark.parametrize("bound", [
    pytest.param(lambda routed: routed + 3, id="under-bound"),
    pytest.param(lambda routed: routed // 2, id="over-bound-recomputed"),
    pytest.param(lambda routed: 0, id="nothing-kept"),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bounded_rows_match_reference(bound, dtype, poison):
    """A saved-row bound under and over the routed rows (the rest recomputed in the backward): output and
    every gradient equal the oracle's."""
    inputs = mlp_inputs(29, 40, 72, 5, 2, 0.3, dtype)
    max_rows = bound(int((inputs[1] >= 0).sum()))
    tri = knowledge_mlp(*inputs, impl="triton", max_rows=max_rows)
    floats = [inputs[0], *inputs[2:]]
    ref_floats = [as_oracle_input(t) for t in floats]
    ref = knowledge_mlp_reference(ref_floats[0], inputs[1].cpu(), *ref_floats[1:])
    assert_outputs_and_grads(tri, ref, floats, ref_floats, NAMES, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("max_rows", [18, 5], ids=["all-rows-kept", "bound-below-S"])
def test_opcheck(max_rows, layout):
    """Schema, fake kernels, autograd registration and AOT dispatch of the fused forward and backward ops;
    with transposed inputs too, where the fake outputs must keep the real ops' (contiguous) strides."""
    import pure_reasoner.kernels.expert_mlp.triton_mlp  # noqa: F401  (registers the ops)
    from pure_reasoner.kernels.routing.triton_routing import routing_metadata_triton

    x_TD, ids_TK, gates_TK, w1, w3, w2 = mlp_inputs(9, 24, 40, 4, 2, 0.3, torch.float32)
    if layout == "transposed":  # dense, not contiguous: the last two dims' strides swapped
        x_TD, gates_TK, w1, w3, w2 = (
            t.transpose(-1, -2).contiguous().transpose(-1, -2).detach().requires_grad_()
            for t in (x_TD, gates_TK, w1, w3, w2)
        )
    meta = routing_metadata_triton(ids_TK, 4)
    ops = torch.ops.pure_reasoner
    fwd_args = (x_TD, meta.slot_order_S, meta.offsets_E, gates_TK, w1, w3, w2, max_rows, True, True, False)
    torch.library.opcheck(ops.triton_knowledge_mlp.default, fwd_args)
    y_TD, a1_HF, a3_HF = ops.triton_knowledge_mlp(*fwd_args)
    plain = [t.detach() for t in (x_TD, meta.slot_order_S, meta.offsets_E, gates_TK, w1, w3, w2, a1_HF, a3_HF)]
    torch.library.opcheck(ops.triton_knowledge_mlp_bwd.default, (torch.randn_like(y_TD), *plain, False, False))


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_reaches_every_fp32_dot(tf32, monkeypatch):
    """knowledge.tf32 goes from the config through the layer's experts and the impl seam to every dot
    kernel's launch of the fwd+bwd (exact 'ieee' when off); the interpreter's dots are exact either way,
    so the result still equals the oracle."""
    from pure_reasoner.kernels.expert_mlp import triton_down, triton_up, triton_wgrad
    from pure_reasoner.moe.config import KnowledgeConfig, MoEConfig
    from pure_reasoner.moe.experts import GroupedExperts
    from pure_reasoner.moe.layer import PureReasonerMoE

    precisions = []
    for module in (triton_up, triton_down, triton_wgrad):
        real = module.launch

        def spy(kernel, grid, *args, _real=real, **kwargs):
            if "DOT_PRECISION" in kwargs:
                precisions.append(kwargs["DOT_PRECISION"])
            return _real(kernel, grid, *args, **kwargs)

        monkeypatch.setattr(module, "launch", spy)
    cfg = KnowledgeConfig(num_experts=5, expert_width=72, top_k=2, impl="triton", tf32=tf32)
    assert PureReasonerMoE(MoEConfig(d_model=40, knowledge=cfg)).experts.tf32 is tf32
    experts = GroupedExperts(40, cfg.expert_width, cfg.num_experts, cfg.impl, tf32=cfg.tf32)
    x_TD, ids_TK, gates_TK, w1, w3, w2 = mlp_inputs(29, 40, 72, 5, 2, 0.3, torch.float32)
    with torch.no_grad():
        for param, value in zip((experts.w1_EDF, experts.w3_EDF, experts.w2_EFD), (w1, w3, w2), strict=True):
            param.copy_(value)
    y = experts(x_TD, ids_TK, gates_TK)
    y.backward(torch.randn_like(y))
    # fwd: up + down; bwd: down (fused), its dw2, up, dw1, dw3
    assert precisions == ["tf32" if tf32 else "ieee"] * 7
    ref = knowledge_mlp_reference(*(as_oracle_input(t) for t in (x_TD, ids_TK, gates_TK, w1, w3, w2)))
    torch.testing.assert_close(y.detach().double(), ref.detach(), rtol=1e-4, atol=1e-5)

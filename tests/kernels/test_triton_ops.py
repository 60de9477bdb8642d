"""Each Triton op against its loop oracle, forward and every gradient; the custom ops pass opcheck."""

import pytest
import torch
from kernel_inputs import DEVICE, DTYPES, TOLERANCE, as_oracle_input, assert_outputs_and_grads, mlp_inputs

from pure_reasoner.kernels.expert_mlp.reference import down_scatter_reference, gather_swiglu_reference
from pure_reasoner.kernels.expert_mlp.triton_down import down_scatter, down_swiglu_bwd
from pure_reasoner.kernels.expert_mlp.triton_up import gather_swiglu
from pure_reasoner.kernels.expert_mlp.triton_wgrad import grouped_wgrad
from pure_reasoner.kernels.routing.metadata import routing_metadata
from pure_reasoner.kernels.routing.triton_routing import routing_metadata_triton

# (T, D, F, E, K, idle share): each names the edge it targets.
CASES = [
    pytest.param(1, 32, 48, 4, 2, 0.0, id="T=1"),
    pytest.param(5, 32, 48, 3, 2, 0.0, id="T*K-below-row-block"),
    pytest.param(29, 40, 72, 7, 2, 0.4, id="prime-E-non-pow2-D-F"),
    pytest.param(20, 24, 40, 4, 4, 0.2, id="K=E"),
    pytest.param(16, 24, 40, 4, 2, 1.0, id="no-token-consults"),
]


def _routing(ids_TK, num_experts):
    meta = routing_metadata(ids_TK.cpu(), num_experts)
    return meta.slot_order_S.to(DEVICE), meta.offsets_E.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,dim,width,num_experts,top_k,idle_share", CASES)
def test_gather_swiglu(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, poison):
    x_TD, ids_TK, _, w1, w3, _ = mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype)
    slot_order_S, offsets_E = _routing(ids_TK, num_experts)
    tri = gather_swiglu(x_TD, slot_order_S, offsets_E, w1, w3, top_k)
    ref_inputs = [as_oracle_input(t) for t in (x_TD, w1, w3)]
    ref = gather_swiglu_reference(ref_inputs[0], ids_TK.cpu(), slot_order_S.cpu(), *ref_inputs[1:])
    assert_outputs_and_grads(tri, ref, [x_TD, w1, w3], ref_inputs, ["x", "w1", "w3"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,dim,width,num_experts,top_k,idle_share", CASES)
def test_down_scatter(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, poison):
    _, ids_TK, gates_TK, _, _, w2 = mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype)
    slot_order_S, offsets_E = _routing(ids_TK, num_experts)
    # Random rows everywhere, idle ones included: the op must ignore those (and give them zero gradient).
    h_SF = torch.randn(num_tokens * top_k, width, dtype=dtype, device=DEVICE, requires_grad=True)
    tri = down_scatter(h_SF, gates_TK, slot_order_S, offsets_E, w2)
    ref_inputs = [as_oracle_input(t) for t in (h_SF, gates_TK, w2)]
    ref = down_scatter_reference(ref_inputs[0], ids_TK.cpu(), ref_inputs[1], slot_order_S.cpu(), ref_inputs[2])
    assert_outputs_and_grads(tri, ref, [h_SF, gates_TK, w2], ref_inputs, ["h", "gates", "w2"], dtype)


@pytest.mark.parametrize("a_gather,b_gather,scale", [(True, False, False), (False, True, True)], ids=["dW1", "dW2"])
def test_grouped_wgrad(a_gather, b_gather, scale, poison):
    num_tokens, top_k, num_experts, dim_in, dim_out = 23, 2, 6, 40, 33
    _, ids_TK, gates_TK, *_ = mlp_inputs(num_tokens, 8, 8, num_experts, top_k, 0.3, torch.float32)
    ids_TK[:, :] = torch.where(ids_TK == 1, 2, ids_TK)  # expert 1 gets no rows: its gradient must be zeros
    meta = routing_metadata(ids_TK.cpu(), num_experts)
    rows = {True: num_tokens, False: num_tokens * top_k}
    a = torch.randn(rows[a_gather], dim_in, device=DEVICE)
    b = torch.randn(rows[b_gather], dim_out, device=DEVICE)
    scale_S = gates_TK.detach().reshape(-1) if scale else None
    slot_order_S, offsets_E = meta.slot_order_S.to(DEVICE), meta.offsets_E.to(DEVICE)
    dw = grouped_wgrad(a, b, slot_order_S, offsets_E, top_k, a_gather, b_gather, scale_S)
    expected = torch.zeros(num_experts, dim_in, dim_out, dtype=torch.float64)
    for r in range(int(meta.num_routed)):
        slot = int(meta.slot_order_S[r])
        e, token = int(ids_TK.reshape(-1)[slot]), slot // top_k
        b_row = b[token if b_gather else r].double().cpu() * (float(scale_S[slot]) if scale else 1.0)
        expected[e] += torch.outer(a[token if a_gather else r].double().cpu(), b_row)
    torch.testing.assert_close(dw.cpu().double(), expected, **TOLERANCE[torch.float32])
    assert dw[1].abs().max() == 0


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims' strides swapped: dense but not contiguous."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2).detach().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(layout):
    """Schema, fake (meta) kernels, autograd registration, and AOT dispatch of every custom op; with
    transposed inputs too, where the fake outputs must still have the real ops' (contiguous) strides."""
    x_TD, ids_TK, gates_TK, w1, w3, w2 = mlp_inputs(9, 24, 40, 4, 2, 0.3, torch.float32)
    if layout == "transposed":
        x_TD, gates_TK, w1, w3, w2 = (_transposed(t) for t in (x_TD, gates_TK, w1, w3, w2))
    slot_order_S, offsets_E = _routing(ids_TK, 4)
    ops = torch.ops.pure_reasoner
    a1_SF, a3_SF = (torch.randn(18, 40, device=DEVICE) for _ in range(2))
    h_SF = torch.randn(18, 40, device=DEVICE, requires_grad=True)
    dy = torch.randn(9, 24, device=DEVICE)
    x, gates, w1_, w3_, w2_, h = (t.detach() for t in (x_TD, gates_TK, w1, w3, w2, h_SF))  # no autograd: bwd ops
    cases = {
        ops.triton_routing.default: (ids_TK, 4, False),
        ops.triton_gather_swiglu.default: (x_TD, slot_order_S, offsets_E, w1, w3, 2, True),
        ops.triton_down_scatter.default: (h_SF, gates_TK, slot_order_S, offsets_E, w2),
        ops.triton_gather_swiglu_bwd.default: (h, x, slot_order_S, offsets_E, w1_, w3_, a1_SF, a3_SF, 2),
        ops.triton_down_scatter_bwd.default: (dy, h, gates, slot_order_S, offsets_E, w2_),
    }
    assert routing_metadata_triton  # its import registered pure_reasoner::triton_routing
    for op, args in cases.items():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_down_swiglu_bwd(dtype, deterministic, poison):
    """The fused backward (SwiGLU backward in the down projection's epilogue) against autograd through the
    oracle of down_scatter(silu(a1) * a3): da1, da3 on the routed rows, dgates and dw2."""
    num_tokens, top_k, num_experts, dim, width = 29, 2, 7, 40, 72
    _, ids_TK, gates_TK, _, _, w2 = mlp_inputs(num_tokens, dim, width, num_experts, top_k, 0.4, dtype)
    slot_order_S, offsets_E = _routing(ids_TK, num_experts)
    a1_SF, a3_SF = (torch.randn(num_tokens * top_k, width, device=DEVICE).to(dtype) for _ in range(2))
    dy_TD = torch.randn(num_tokens, dim, device=DEVICE).to(dtype)
    da1, da3, dgates, dw2 = down_swiglu_bwd(dy_TD, a1_SF, a3_SF, gates_TK.detach(), slot_order_S, offsets_E,
                                            w2.detach(), deterministic)
    ref_a1, ref_a3, ref_gates, ref_w2 = (as_oracle_input(t.detach()).requires_grad_()
                                         for t in (a1_SF, a3_SF, gates_TK, w2))
    h_ref = torch.nn.functional.silu(ref_a1) * ref_a3
    y_ref = down_scatter_reference(h_ref, ids_TK.cpu(), ref_gates, slot_order_S.cpu(), ref_w2)
    grads = torch.autograd.grad(y_ref, [ref_a1, ref_a3, ref_gates, ref_w2], dy_TD.cpu().double())
    routed = int(offsets_E[-1])
    tol = TOLERANCE[dtype]
    for name, got, want in [("da1", da1[:routed], grads[0][:routed]), ("da3", da3[:routed], grads[1][:routed]),
                            ("dgates", dgates, grads[2]), ("dw2", dw2, grads[3])]:
        torch.testing.assert_close(got.cpu().double(), want, **tol, msg=name)


def test_expert_id_device_assert(monkeypatch):
    """With Triton's debug checks on, an id outside [-1, E) stops the routing kernel (on a GPU: a device
    assert, compiled in only with ``debug``; kernels.triton_aot checks that). The interpreter runs device
    asserts only when its own options say debug, so they are switched on here."""
    from triton.runtime import interpreter
    from triton.runtime.errors import InterpreterError

    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        interpreter.InterpreterOptions(debug=True))
    ok = torch.tensor([[0, -1], [3, 2]], device=DEVICE)
    routing_metadata_triton(ok, 4, debug=True)
    for bad in (4, -2):
        with pytest.raises(InterpreterError, match="expert id out of"):
            routing_metadata_triton(torch.tensor([[0, bad], [1, 2]], device=DEVICE), 4, debug=True)

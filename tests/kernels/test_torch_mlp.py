"""The fast PyTorch knowledge path against the loop oracle: forward and every gradient."""

import pytest
import torch

from pure_reasoner.kernels import knowledge_mlp
from pure_reasoner.kernels.expert_mlp.random_inputs import random_mlp_inputs
from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch, mlp_backward, mlp_forward
from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, one_expert=None):
    x_TD, ids_TK, gates_TK, *weights = random_mlp_inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype,
                                                         one_expert=one_expert)
    return x_TD, ids_TK, gates_TK, weights


CASES = [
    pytest.param(1, 16, 32, 4, 2, 0.0, id="T=1"),
    pytest.param(40, 16, 32, 4, 2, 1.0, id="no-token-consults"),
    pytest.param(37, 16, 32, 4, 4, 0.3, id="K=E"),
    pytest.param(45, 24, 40, 7, 2, 0.5, id="prime-E"),
    pytest.param(33, 20, 36, 5, 2, 0.2, id="aligned-non-pow2-D-F"),
    pytest.param(29, 15, 33, 3, 2, 0.2, id="unaligned-D-F-loop-fallback"),
]


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "masked"])
@pytest.mark.parametrize("num_tokens,dim,width,num_experts,top_k,idle_share", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, compact, poison):
    x_TD, ids_TK, gates_TK, weights = _inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype)
    tri = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights, compact=compact)
    ref = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, *weights)
    torch.testing.assert_close(tri, ref, **TOLERANCE[dtype])
    if idle_share < 1.0:
        assert tri.abs().sum() > 0
    grad_TD = torch.randn_like(ref)
    inputs = [x_TD, gates_TK, *weights]
    tri_grads = torch.autograd.grad(tri, inputs, grad_TD, allow_unused=True)
    # With nothing routed the oracle's output is a constant: every gradient is zero.
    ref_grads = torch.autograd.grad(ref, inputs, grad_TD, allow_unused=True) if ref.requires_grad else [None] * 5
    for name, t, r in zip(["x", "gates", "w1", "w3", "w2"], tri_grads, ref_grads, strict=True):
        if r is None:  # nothing routed: the oracle never touched this input
            assert t is None or t.abs().max() == 0, name
            continue
        torch.testing.assert_close(t.to(r.dtype), r, **TOLERANCE[dtype], msg=name)


def test_all_tokens_to_one_expert():
    x_TD, ids_TK, gates_TK, weights = _inputs(31, 16, 32, 4, 1, 0.0, torch.float32, one_expert=3)
    tri = knowledge_mlp(x_TD, ids_TK, gates_TK, *weights)
    ref = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, *weights)
    torch.testing.assert_close(tri, ref, **TOLERANCE[torch.float32])
    tri.backward(torch.randn_like(tri))
    assert weights[0].grad[:3].abs().max() == 0 and weights[0].grad[3].abs().max() > 0


def test_expanded_upstream_gradient():
    """``y.sum().backward()`` sends a stride-0 gradient, which grouped_mm's CPU backward rejects."""
    x_TD, ids_TK, gates_TK, weights = _inputs(16, 16, 32, 4, 2, 0.0, torch.float32)
    knowledge_mlp(x_TD, ids_TK, gates_TK, *weights).sum().backward()
    assert torch.isfinite(x_TD.grad).all() and torch.isfinite(weights[2].grad).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["scatter-add", "deterministic"])
@pytest.mark.parametrize("max_rows", [32, 5], ids=["all-rows-kept", "bound-below-S-recomputes"])
def test_masked_path_never_reads_values(max_rows, deterministic):
    """On the meta device a host read raises; the masked forward and backward must still run, with the
    saved-row bound below T*K (a recomputed window) too, and with the deterministic combine.

    Calls the functions behind the custom ops: through the op, meta tensors would reach its fake kernel.
    """
    x_TD, ids_TK, gates_TK, weights = _inputs(16, 16, 32, 4, 2, 0.2, torch.float32)
    # bf16: grouped_mm's meta kernel accepts only bf16 (the CPU kernel takes fp32 too).
    x_TD, w1, w3, w2 = (t.detach().to("meta", torch.bfloat16) for t in (x_TD, *weights))
    gates_TK = gates_TK.detach().to("meta")
    y_TD, *saved = mlp_forward(x_TD, ids_TK.to("meta"), gates_TK, w1, w3, w2, False, max_rows, deterministic)
    assert saved[0].shape == (max_rows, 32)
    grads = mlp_backward(torch.ones_like(y_TD), x_TD, gates_TK, w1, w3, w2, *saved, False, deterministic)
    assert y_TD.device.type == "meta"
    assert [g.shape for g in grads[:5]] == [t.shape for t in (x_TD, gates_TK, w1, w3, w2)]
    assert grads[5].numel() == 0  # no fused gate/up weight


def _as_views(weights):
    """The weights as transformers stores them: gate and up halves of one [E, 2F, D] tensor, down as [E, D, F]."""
    w1, w3, w2 = (w.detach() for w in weights)
    gate_EF, up_EF = torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], 1).split(w1.shape[2], dim=1)
    return [gate_EF.transpose(1, 2), up_EF.transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2)]


@pytest.mark.parametrize("layout", ["contiguous", "transformers-views", "fused"])
@pytest.mark.parametrize("compact,max_rows", [(True, 18), (False, 18), (False, 4)],
                         ids=["compact", "masked", "masked-bound-below-S"])
def test_opcheck(compact, max_rows, layout):
    """Schema, fake kernels (a data-dependent row count when compact; weight gradients laid out as the weights;
    the fused gate/up weight), autograd, AOT dispatch."""
    x_TD, ids_TK, gates_TK, weights = _inputs(9, 16, 32, 4, 2, 0.3, torch.float32)
    w13 = None
    if layout == "transformers-views":
        weights = [w.requires_grad_() for w in _as_views(weights)]
    elif layout == "fused":
        _, w13, w1, w3, w2 = _fused(weights)
        weights = [w1, w3, w2]
    ops = torch.ops.pure_reasoner
    args = (x_TD, ids_TK, gates_TK, *weights, compact, max_rows)
    torch.library.opcheck(ops.torch_knowledge_mlp.default, (*args, True, w13))
    y_TD, *saved = ops.torch_knowledge_mlp(*args, False, w13)
    plain = [t.detach() for t in (x_TD, gates_TK, *weights)]
    bwd_args = (torch.randn_like(y_TD), *plain, *(t.detach() for t in saved), compact, True,
                None if w13 is None else w13.detach())
    torch.library.opcheck(ops.torch_knowledge_mlp_bwd.default, bwd_args)


def _fused(weights):
    """(gate_up [E, 2F, D] leaf, w13_ED2F view, w1 and w3 its halves, w2) as transformers stores SwiGLU experts."""
    w1, w3, w2 = (w.detach() for w in weights)
    gate_up = torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], 1).requires_grad_()
    w13 = gate_up.transpose(1, 2)
    return gate_up, w13, w13[:, :, : w1.shape[2]], w13[:, :, w1.shape[2] :], w2.clone().requires_grad_()


@pytest.mark.parametrize("compact,max_rows", [(True, None), (False, None), (False, 7)],
                         ids=["compact", "masked", "masked-recompute"])
def test_fused_gate_up_matches_reference(compact, max_rows):
    x_TD, ids_TK, gates_TK, weights = _inputs(45, 24, 40, 7, 2, 0.3, torch.float64)
    gate_up, w13, w1, w3, w2 = _fused(weights)
    x2_TD, gates2_TK = (t.detach().clone().requires_grad_() for t in (x_TD, gates_TK))
    y_TD = knowledge_mlp_torch(x2_TD, ids_TK, gates2_TK, w1, w3, w2, compact=compact, max_rows=max_rows, w13_ED2F=w13)
    ref = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, *weights)
    torch.testing.assert_close(y_TD, ref, **TOLERANCE[torch.float64])
    dy_TD = torch.randn_like(ref)
    (y_TD * dy_TD).sum().backward()
    (ref * dy_TD).sum().backward()
    want_gate_up = torch.cat([weights[0].grad.transpose(1, 2), weights[1].grad.transpose(1, 2)], 1)
    for got, want in ((x2_TD.grad, x_TD.grad), (gates2_TK.grad, gates_TK.grad), (gate_up.grad, want_gate_up),
                      (w2.grad, weights[2].grad)):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    assert gate_up.grad.is_contiguous()  # handed over in the stored layout


def test_fused_gate_up_must_be_twice_as_wide():
    x_TD, ids_TK, gates_TK, weights = _inputs(8, 16, 32, 4, 2, 0.0, torch.float32)
    with pytest.raises(ValueError, match=r"w13_ED2F must have shape \(4, 16, 64\)"):
        knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights, w13_ED2F=weights[0])


def test_weight_gradients_of_transposed_views_come_back_in_their_layout():
    x_TD, ids_TK, gates_TK, weights = _inputs(40, 16, 32, 4, 2, 0.2, torch.float64)
    views = [w.requires_grad_() for w in _as_views(weights)]
    knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *views).sum().backward()
    knowledge_mlp_reference(x_TD, ids_TK, gates_TK, *weights).sum().backward()
    for view, weight in zip(views, weights, strict=True):
        torch.testing.assert_close(view.grad, weight.grad, **TOLERANCE[torch.float64])
    with torch.no_grad():
        y_TD, *saved = mlp_forward(x_TD, ids_TK, gates_TK, *views, True, 80, False)
        grads = mlp_backward(torch.ones_like(y_TD), x_TD, gates_TK, *views, *saved, True, False)
    for view, grad in zip(views, grads[2:5], strict=True):  # unit stride along D (or F), as the views have it
        assert view.stride(1) == grad.stride(1) == 1 and grad.transpose(1, 2).is_contiguous()


def test_compiles_without_graph_breaks():
    x_TD, ids_TK, gates_TK, weights = _inputs(12, 16, 32, 4, 2, 0.3, torch.float32)
    compiled = torch.compile(knowledge_mlp_torch, backend="aot_eager", fullgraph=True)
    inputs = [x_TD, gates_TK, *weights]
    y, y_eager = compiled(x_TD, ids_TK, gates_TK, *weights), knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights)
    torch.testing.assert_close(y, y_eager)
    dy = torch.randn_like(y)
    grads, grads_eager = torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_eager, inputs, dy)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(x_TD=a["x_TD"][None]), "x_TD must be 2-D"),
        (lambda a: a.update(gates_TK=a["gates_TK"][:-1]), "gates_TK must have shape"),
        (lambda a: a.update(w2_EFD=a["w2_EFD"].transpose(1, 2)), "w2_EFD must have shape"),
        (lambda a: a.update(w1_EDF=a["w1_EDF"].double()), "w1_EDF has dtype"),
        (lambda a: a.update(impl="cuda-magic"), "impl must be one of"),
        (lambda a: a.update(max_rows=-1), "max_rows must be None or an int >= 0, got -1"),
        (lambda a: a.update(max_rows=2.5), "max_rows must be None or an int >= 0, got 2.5"),
    ],
)
def test_bad_input(change, match):
    x_TD, ids_TK, gates_TK, (w1, w3, w2) = _inputs(8, 16, 32, 4, 2, 0.0, torch.float32)
    args = dict(x_TD=x_TD, expert_ids_TK=ids_TK, gates_TK=gates_TK, w1_EDF=w1, w3_EDF=w3, w2_EFD=w2)
    change(args)
    with pytest.raises(ValueError, match=match):
        knowledge_mlp(**args)


def test_nothing_routed_leaves_expert_grads_untouched():
    """Compact mode, no slot routed: backward writes no [E, D, F] zeros; every .grad stays None."""
    x_TD, ids_TK, gates_TK, weights = _inputs(16, 16, 32, 4, 2, 1.0, torch.float32)
    assert (ids_TK == NOT_CONSULTED).all()
    y_TD = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights, compact=True)
    (y_TD.sum() + x_TD.sum()).backward()  # x also feeds another branch, as the reasoning expert's input does
    assert y_TD.abs().max() == 0
    assert all(w.grad is None for w in weights) and gates_TK.grad is None
    torch.testing.assert_close(x_TD.grad, torch.ones_like(x_TD))


def _idle_rank(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        idle = 1.0 if rank == 0 else 0.0  # rank 0 routes nothing, rank 1 routes every slot
        x_TD, ids_TK, gates_TK, weights = _inputs(16, 16, 32, 4, 2, idle, torch.float32)
        knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights, compact=True).sum().backward()
        results[rank] = [None if w.grad is None else float(w.grad.abs().sum()) for w in weights]
    finally:
        torch.distributed.destroy_process_group()


def test_nothing_routed_still_gives_zero_grads_among_several_ranks(tmp_path):
    """ZeRO reduces the gradients that exist: a rank that routed nothing must still produce every one (zeros), or
    its collectives would not match those of a rank that routed rows."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_idle_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0] == [0.0, 0.0, 0.0]  # zeros, not None
    assert all(g is not None and g > 0 for g in results[1])


# Saved-row bound of the masked path relative to the routed rows R: each regime names the edge it targets.
BOUNDS = [
    pytest.param(lambda routed: routed + 3, id="under-bound"),
    pytest.param(lambda routed: routed, id="bound-equals-routed"),
    pytest.param(lambda routed: routed // 2, id="over-bound-recomputed"),
    pytest.param(lambda routed: 0, id="nothing-kept"),
]


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("num_tokens,dim,width,num_experts,top_k,idle_share", [
    pytest.param(45, 24, 40, 7, 2, 0.5, id="prime-E"),
    pytest.param(29, 15, 33, 3, 2, 0.2, id="unaligned-D-F-loop-fallback"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_rows_match_reference(num_tokens, dim, width, num_experts, top_k, idle_share, dtype, bound, poison):
    """Masked path with a saved-row bound: under it and over it (the rows past it recomputed in the
    backward), output and every gradient equal the loop oracle's; only the bound's rows are kept."""
    x_TD, ids_TK, gates_TK, weights = _inputs(num_tokens, dim, width, num_experts, top_k, idle_share, dtype)
    max_rows = bound(int((ids_TK >= 0).sum()))
    tri = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights, compact=False, max_rows=max_rows)
    ref = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, *weights)
    torch.testing.assert_close(tri, ref, **TOLERANCE[dtype])
    inputs = [x_TD, gates_TK, *weights]
    grad_TD = torch.randn_like(ref)
    tri_grads = torch.autograd.grad(tri, inputs, grad_TD)
    ref_grads = torch.autograd.grad(ref, inputs, grad_TD)
    for name, t, r in zip(["x", "gates", "w1", "w3", "w2"], tri_grads, ref_grads, strict=True):
        torch.testing.assert_close(t, r, **TOLERANCE[dtype], msg=name)
    _, a1_HF, *_ = torch.ops.pure_reasoner.torch_knowledge_mlp(x_TD, ids_TK, gates_TK, *weights, False, max_rows, False)
    assert a1_HF.shape == (min(max_rows, ids_TK.numel()), width)

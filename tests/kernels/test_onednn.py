"""The GEMM engines (oneDNN grouped GEMMs, the CPU linear op on every engine) against float64 references."""

import pytest
import torch

from pure_reasoner.kernels import engines, onednn_gemm, onednn_linear
from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch
from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


# Empty experts first, in the middle and last; rows past the last offset (masked mode) at the end.
COUNTS = [0, 5, 1, 0, 9, 3, 0]


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous-w", "transposed-view-w"])
@pytest.mark.parametrize("extra_rows", [0, 4])
def test_grouped_matmul(transposed, extra_rows, poison):
    offsets_E = _offsets(COUNTS)
    rows, dim_in, dim_out = sum(COUNTS) + extra_rows, 24, 40
    x_RI = torch.randn(rows, dim_in)
    w_EIO = torch.randn(len(COUNTS), dim_out, dim_in).transpose(1, 2) if transposed else torch.randn(
        len(COUNTS), dim_in, dim_out)
    got_RO = onednn_gemm.grouped_matmul(x_RI, w_EIO, offsets_E)
    want_RO = torch.zeros(rows, dim_out, dtype=torch.float64)
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        want_RO[start:end] = x_RI[start:end].double() @ w_EIO[e].double()
        start = end
    torch.testing.assert_close(got_RO.double(), want_RO, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_wgrad(poison):
    offsets_E = _offsets(COUNTS)
    a_RI, b_RO = torch.randn(sum(COUNTS), 24), torch.randn(sum(COUNTS), 40)
    got_EIO = onednn_gemm.grouped_matmul_wgrad(a_RI, b_RO, offsets_E)
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        want_IO = a_RI[start:end].double().t() @ b_RO[start:end].double()  # zeros for an empty expert
        torch.testing.assert_close(got_EIO[e].double(), want_IO, rtol=1e-5, atol=1e-5, msg=f"expert {e}")
        start = end


def test_usable_only_for_cpu_fp32():
    assert onednn_gemm.usable(torch.randn(2, 2))
    assert not onednn_gemm.usable(torch.randn(2, 2), torch.randn(2, 2, dtype=torch.float64))
    assert not onednn_gemm.usable(torch.randn(2, 2, dtype=torch.bfloat16))


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    """Names of every node in t's backward graph."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


# Big enough for oneDNN (rows * I * O >= MIN_DENSE_MACS); smaller GEMMs go to F.linear.
DIM_IN, DIM_OUT = 512, 520


@pytest.fixture(params=["mkl", "onednn", "auto"])
def gemm_engine(request, monkeypatch):
    """Every override of the engine choice: the numerics must not depend on which engine runs."""
    monkeypatch.setenv(engines.ENV_OVERRIDE, request.param)
    return request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(65,), (5, 13)], ids=["2d", "3d"])
def test_linear_matches_float64(bias, lead, gemm_engine):
    x = torch.randn(*lead, DIM_IN, requires_grad=True)
    w = (torch.randn(DIM_OUT, DIM_IN) / DIM_IN**0.5).requires_grad_()
    b = torch.randn(DIM_OUT, requires_grad=True) if bias else None
    got = onednn_linear.linear(x, w, b)
    assert any("cpu_linear" in name for name in _autograd_nodes(got))
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(got)
    inputs = [x, w] + ([b] if bias else [])
    got_grads, want_grads = torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy.double())
    for name, g, r in zip("xwb"[: len(inputs)], got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-5, msg=name)


def test_linear_takes_an_expanded_upstream_gradient(gemm_engine):
    x, w = torch.randn(65, DIM_IN, requires_grad=True), torch.randn(DIM_OUT, DIM_IN, requires_grad=True)
    onednn_linear.linear(x, w).sum().backward()  # dy is a stride-0 expand of a scalar
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(65, DIM_IN), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(DIM_OUT, DIM_IN), rtol=1e-5, atol=1e-4)


def test_small_linear_goes_to_f_linear():
    y = onednn_linear.linear(torch.randn(4, 8, requires_grad=True), torch.randn(3, 8))
    assert not any("cpu_linear" in name for name in _autograd_nodes(y))


def test_knowledge_mlp_through_each_engine_matches_reference(gemm_engine):
    """The torch path at expert weights big enough for the engine choice (MIN_GROUPED_WEIGHT), against the oracle."""
    num_tokens, dim, width, num_experts = 24, 512, 512, 3
    x_TD = torch.randn(num_tokens, dim, requires_grad=True)
    ids_TK = torch.stack([torch.randperm(num_experts)[:2] for _ in range(num_tokens)])
    ids_TK[::5, 1] = NOT_CONSULTED
    gates_TK = torch.rand(num_tokens, 2, requires_grad=True)
    weights = [(torch.randn(num_experts, a, b) / a**0.5).requires_grad_() for a, b in ((dim, width),) * 2]
    weights.append((torch.randn(num_experts, width, dim) / width**0.5).requires_grad_())
    inputs = [x_TD, gates_TK, *weights]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    got = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, *weights)
    want = knowledge_mlp_reference(inputs64[0], ids_TK, *inputs64[1:])
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(got)
    got_grads, want_grads = torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs64, dy.double())
    for name, g, r in zip(["x", "gates", "w1", "w3", "w2"], got_grads, want_grads, strict=True):
        # fp32 rounding grows with the gradient's scale (dgates reach ~30 here: sums over D of products)
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_linear_opcheck_and_compile():
    x, w = torch.randn(65, DIM_IN, requires_grad=True), torch.randn(DIM_OUT, DIM_IN, requires_grad=True)
    torch.library.opcheck(torch.ops.pure_reasoner.cpu_linear.default, (x, w))
    bwd_args = (torch.randn(65, DIM_OUT), x.detach(), w.detach())
    torch.library.opcheck(torch.ops.pure_reasoner.cpu_linear_bwd.default, bwd_args)
    compiled = torch.compile(onednn_linear.linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), x @ w.t(), rtol=1e-4, atol=1e-3)


def test_linear_falls_back_off_fp32_cpu():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(onednn_linear.linear(x, w), x @ w.t())

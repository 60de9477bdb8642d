"""The ``small`` engine's kernels (``kernels.small_gemm``, built here for this CPU) against a float64 matmul per
expert: every tile edge, both weight layouts, empty and large experts, thread counts; build failures."""

import pytest
import torch

from pure_reasoner.kernels import small_gemm

# Skipped only where no compiler exists; with one, a source that fails to build fails these tests.
pytestmark = pytest.mark.skipif(small_gemm.compiler() is None,
                                reason="no C++ compiler: the small engine is not offered")

# Empty experts first, in the middle and last; 1..13 rows cover every row-block remainder of both tile shapes; 70
# rows is above max_rows=64 (the expert goes to ``large``).
COUNTS = [0, 1, 2, 3, 4, 5, 6, 7, 0, 13, 70, 0]
# (I, O): full tiles with 1024-wide-like multiples, one-vector tails, single-column tails, a width below a vector.
DIMS = [(64, 128), (37, 53), (130, 17), (5, 3), (256, 200)]


def _oracle_mm(x_RI, w_EIO, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x_RI[start:start + n].double() @ w_EIO[e].double())
        start += n
    return torch.cat(out)


def _oracle_wgrad(a_RI, b_RO, counts):
    out, start = [], 0
    for n in counts:
        out.append(a_RI[start:start + n].double().t() @ b_RO[start:start + n].double())  # zeros when n == 0
        start += n
    return torch.stack(out)


def _offsets(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dims", DIMS, ids=[f"I{i}-O{o}" for i, o in DIMS])
@pytest.mark.parametrize("layout", ["contiguous", "transposed-view"])
def test_grouped_matmul_matches_float64(dims, layout, poison):
    in_dim, out_dim = dims
    gen = torch.Generator().manual_seed(in_dim * out_dim)
    rows = sum(COUNTS)
    x_RI = torch.randn(rows + 3, in_dim, generator=gen)  # 3 rows past the last offset: not read, not written
    if layout == "contiguous":
        w_EIO = torch.randn(len(COUNTS), in_dim, out_dim, generator=gen)
    else:
        w_EIO = torch.randn(len(COUNTS), out_dim, in_dim, generator=gen).transpose(1, 2)
    got = small_gemm.grouped_matmul(x_RI, w_EIO, _offsets(COUNTS))
    assert got.shape == (rows + 3, out_dim)
    torch.testing.assert_close(got[:rows].double(), _oracle_mm(x_RI, w_EIO, COUNTS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", DIMS, ids=[f"I{i}-O{o}" for i, o in DIMS])
def test_grouped_wgrad_matches_float64(dims, poison):
    in_dim, out_dim = dims
    gen = torch.Generator().manual_seed(in_dim + out_dim)
    rows = sum(COUNTS)
    a_RI = torch.randn(rows, in_dim, generator=gen)
    b_RO = torch.randn(rows, out_dim, generator=gen)
    got = small_gemm.grouped_matmul_wgrad(a_RI, b_RO, _offsets(COUNTS))
    assert got.shape == (len(COUNTS), in_dim, out_dim) and got.is_contiguous()
    torch.testing.assert_close(got.double(), _oracle_wgrad(a_RI, b_RO, COUNTS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_on_wide_weights_few_and_many_experts(threads):
    """The forward's tasks: whole weight rows when the experts are at least the threads, 256-column chunks (two and a
    remainder at 600 columns) when they are fewer; both against the float64 oracle."""
    gen = torch.Generator().manual_seed(2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for counts in ([7], [5, 9, 3]):
            x_RI, w_EIO = torch.randn(sum(counts), 40, generator=gen), torch.randn(len(counts), 40, 600, generator=gen)
            torch.testing.assert_close(small_gemm.grouped_matmul(x_RI, w_EIO, _offsets(counts)).double(),
                                       _oracle_mm(x_RI, w_EIO, counts), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_strided_row_operands_are_read_in_place():
    """Rows that are a column slice of a wider tensor (row stride > width) give the same result."""
    gen = torch.Generator().manual_seed(1)
    counts = [4, 0, 9]
    wide = torch.randn(sum(counts), 50, generator=gen)
    x_RI, b_RO = wide[:, 3:40], wide[:, 10:30]
    w_EIO = torch.randn(3, 37, 20, generator=gen)
    offsets = _offsets(counts)
    torch.testing.assert_close(small_gemm.grouped_matmul(x_RI, w_EIO, offsets).double(),
                               _oracle_mm(x_RI, w_EIO, counts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small_gemm.grouped_matmul_wgrad(x_RI, b_RO, offsets).double(),
                               _oracle_wgrad(x_RI, b_RO, counts), rtol=1e-5, atol=1e-5)


def test_only_experts_above_max_rows_go_to_large():
    calls = []

    def spy(a, b, out):
        calls.append((tuple(a.shape), tuple(b.shape)))
        out.copy_(a @ b)

    counts = [3, 9, 0, 10]
    x_RI = torch.randn(sum(counts), 8)
    w_EIO = torch.randn(4, 8, 16)
    small_gemm.grouped_matmul(x_RI, w_EIO, _offsets(counts), max_rows=9, large=spy)
    assert calls == [((10, 8), (8, 16))]
    calls.clear()
    small_gemm.grouped_matmul_wgrad(x_RI, torch.randn(sum(counts), 16), _offsets(counts), max_rows=9, large=spy)
    assert calls == [((8, 10), (10, 16))]


def test_result_does_not_depend_on_the_thread_count():
    """Each output element is one task's sum in a fixed order: bitwise equal with 1 and 2 threads."""
    counts = [5, 17, 0, 33]
    x_RI, w_EIO, b_RO = torch.randn(sum(counts), 96), torch.randn(4, 96, 80), torch.randn(sum(counts), 80)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((small_gemm.grouped_matmul(x_RI, w_EIO, _offsets(counts)),
                            small_gemm.grouped_matmul_wgrad(x_RI, b_RO, _offsets(counts))))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_refused(dtype):
    x_RI, w_EIO = torch.randn(4, 8, dtype=dtype), torch.randn(1, 8, 8, dtype=dtype)
    with pytest.raises(ValueError, match=str(dtype)):
        small_gemm.grouped_matmul(x_RI, w_EIO, torch.tensor([4], dtype=torch.int32))


def test_failed_build_raises_and_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="failed to build"):
        small_gemm.build(tmp_path, "false")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_build_is_cached_per_source_and_compiler(tmp_path):
    cxx = small_gemm.compiler()
    first = small_gemm.build(tmp_path, cxx)
    stamp = first.stat().st_mtime_ns
    assert small_gemm.build(tmp_path, cxx) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


@pytest.mark.parametrize("fused", [False, True], ids=["w1-w3", "fused-w13"])
def test_knowledge_mlp_on_the_small_engine_matches_the_oracle(fused, monkeypatch):
    """The whole knowledge path (forward, every gradient) with the small engine picked for both grouped classes, on
    weights big enough to use it; one expert gets more rows than ``SMALL_ROWS`` (handed to the dense engine)."""
    from pure_reasoner.kernels import engines
    from pure_reasoner.kernels.expert_mlp.random_inputs import random_mlp_inputs
    from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
    from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch

    choice = engines.EngineChoice(dense="mkl", grouped="small", grouped_wgrad="small", grouped_large="mkl",
                                  source="override",
                                  gflops={"grouped": {"small": 2.0, "mkl": 1.0}})
    monkeypatch.setattr(engines, "current", lambda: choice)
    gen = torch.Generator().manual_seed(3)
    x_TD, ids_TK, gates_TK, w1, w3, w2 = random_mlp_inputs(36, 512, 512, 4, 2, 0.3, torch.float32, generator=gen)
    ids_TK[:34, 0] = 2  # expert 2: > SMALL_ROWS rows
    assert (ids_TK == 2).sum() > small_gemm.SMALL_ROWS
    ref = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, w1, w3, w2)
    dy_TD = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x_TD, gates_TK, w1, w3, w2], dy_TD)
    if fused:
        w13 = torch.cat([w1, w3], 2).detach().requires_grad_()
        y = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, w13[..., :512], w13[..., 512:], w2, w13_ED2F=w13)
        dx, dg, dw13, dw2 = torch.autograd.grad(y, [x_TD, gates_TK, w13, w2], dy_TD)
        got = (dx, dg, dw13[..., :512], dw13[..., 512:], dw2)
    else:
        y = knowledge_mlp_torch(x_TD, ids_TK, gates_TK, w1, w3, w2)
        got = torch.autograd.grad(y, [x_TD, gates_TK, w1, w3, w2], dy_TD)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    for name, g, w in zip(["x", "gates", "w1", "w3", "w2"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["offsets-past-rows", "one-offset-too-few", "inner-dim", "wgrad-rows"])
def test_shapes_that_would_leave_the_buffers_are_refused(case):
    """The C kernels trust their arguments: every shape or offset that would read or write past a buffer is a
    ValueError here, before any kernel runs."""
    x_RI, w_EIO, b_RO = torch.randn(6, 8), torch.randn(2, 8, 4), torch.randn(6, 4)
    offsets = torch.tensor([3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match={"offsets-past-rows": "past the 6 rows", "one-offset-too-few": "one entry",
                                          "inner-dim": r"\[R, 8\]", "wgrad-rows": "same rows"}[case]):
        if case == "offsets-past-rows":
            small_gemm.grouped_matmul(x_RI, w_EIO, torch.tensor([3, 7], dtype=torch.int32))
        elif case == "one-offset-too-few":
            small_gemm.grouped_matmul(x_RI, w_EIO, offsets[:1])
        elif case == "inner-dim":
            small_gemm.grouped_matmul(x_RI[:, :5], w_EIO, offsets)
        else:
            small_gemm.grouped_matmul_wgrad(x_RI, b_RO[:5], offsets)


def test_the_engine_builds_where_a_compiler_exists():
    """A source that does not compile is a failure here, not a silently missing engine."""
    assert small_gemm.available()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_experts_with_many_rows_run_on_the_grouped_large_pick(monkeypatch):
    """With ``small`` picked for the grouped GEMMs, an expert above ``SMALL_ROWS`` is one GEMM on the machine's
    ``grouped_large`` engine (here oneDNN, the dense pick being MKL), once, on exactly its rows; the others stay on
    the small kernels."""
    from pure_reasoner.kernels import engines, onednn_gemm
    from pure_reasoner.kernels.expert_mlp import torch_mlp

    choice = engines.EngineChoice(dense="mkl", grouped="small", grouped_wgrad="small", grouped_large="onednn",
                                  source="override")
    monkeypatch.setattr(engines, "current", lambda: choice)
    calls = []

    def spy(a, b):
        calls.append(a.shape[0])
        return torch.mm(a, b)

    monkeypatch.setattr(onednn_gemm, "matmul", spy)
    rows = [3, small_gemm.SMALL_ROWS + 5, 0, 7]
    gen = torch.Generator().manual_seed(5)
    x_RI = torch.randn(sum(rows), 512, generator=gen)  # 512 x 512 weights: big enough for the picks
    w_EIO = torch.randn(len(rows), 512, 512, generator=gen)
    offsets_E = torch.tensor(rows, dtype=torch.int32).cumsum(0).to(torch.int32)
    got = torch_mlp.grouped_matmul(x_RI, w_EIO, offsets_E)
    assert calls == [small_gemm.SMALL_ROWS + 5]
    want = torch.cat([x @ w for x, w in zip(x_RI.split(rows), w_EIO, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

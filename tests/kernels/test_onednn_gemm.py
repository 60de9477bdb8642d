"""oneDNN grouped GEMMs against a per-expert ``torch.mm`` loop in float64."""

import pytest
import torch

from kernels import onednn_gemm

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

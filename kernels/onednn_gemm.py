"""Dense and grouped fp32 GEMMs through oneDNN on CPU: one of the engines ``kernels.engines`` picks from.

PyTorch sends a CPU fp32 ``torch.mm`` (and ``F.grouped_mm``'s per-expert loop) to MKL, which runs
non-Intel x86 CPUs through slower code paths: on an AMD EPYC (AVX-512) MKL reaches ~170 GFLOP/s on a
large dense fp32 matmul with 2 threads and oneDNN ~370, at the same fp32 precision; on an Intel Xeon
MKL is ~15% ahead. Which one runs is measured on the running machine (``kernels.engines``).
``torch.ops.mkldnn._linear_pointwise`` (the op Inductor uses for CPU linears) is oneDNN's fp32 GEMM
``y = a @ wᵀ``; it takes strided views without copying them first.

Offsets are read on the host (a CPU tensor's values are in host memory: no device sync).
Shapes: R rows sorted by expert, E experts, I input and O output width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pure_reasoner.kernels.routing.metadata import expert_row_ranges

# A constant of the build (torch.compile cannot trace ``torch.backends.mkldnn.is_available()``).
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
# oneDNN JIT-compiles a kernel for every new GEMM shape (~0.5 ms here, then cached); MKL does not. So
# oneDNN only pays off for GEMMs big enough that the compile is quickly amortised: per-expert weights of at
# least 512 x 512 (the grouped path sees a new row count per expert now and then), and dense GEMMs of at
# least 2**24 multiply-adds (training repeats the same shape every step; generation grows it each token).
MIN_GROUPED_WEIGHT = 512 * 512
MIN_DENSE_MACS = 2**24


def usable(*tensors: torch.Tensor) -> bool:
    """oneDNN can run these: CPU fp32 tensors on a PyTorch build with oneDNN."""
    return _HAS_ONEDNN and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


def _linear(a_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """a @ wᵀ: [M, O]."""
    return torch.ops.mkldnn._linear_pointwise(a_MI, w_OI, None, "none", [], "")


def matmul(a_MI: torch.Tensor, b_IO: torch.Tensor) -> torch.Tensor:
    """a @ b: [M, O] (a dense matmul through oneDNN)."""
    return _linear(a_MI, b_IO.t())


def dense_matmul_engines(a: torch.Tensor) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The dense matmuls that can run on ``a``'s device and dtype, by name: what a matmul peak is the best of."""
    return {"torch.mm": torch.mm, **({"onednn": matmul} if usable(a) else {})}


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows ``[offsets[e-1], offsets[e])`` of x times ``w[e]``: [R, O]; rows past ``offsets[-1]`` are zero."""
    out_RO = x_RI.new_empty(x_RI.shape[0], w_EIO.shape[2])
    end = 0
    for e, start, end in expert_row_ranges(offsets_E):
        if end > start:
            out_RO[start:end] = matmul(x_RI[start:end], w_EIO[e])
    out_RO[end:].zero_()
    return out_RO


def grouped_matmul_wgrad(a_RI: torch.Tensor, b_RO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per expert, the sum over its rows of ``a[r]ᵀ b[r]``: [E, I, O], zero for experts with no rows."""
    out_EIO = a_RI.new_empty(offsets_E.numel(), a_RI.shape[1], b_RO.shape[1])
    for e, start, end in expert_row_ranges(offsets_E):
        if end > start:
            out_EIO[e] = matmul(a_RI[start:end].t(), b_RO[start:end])
        else:
            out_EIO[e].zero_()
    return out_EIO

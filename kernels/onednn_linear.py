"""``F.linear`` with its big fp32 CPU GEMMs on this machine's fastest engine, forward and backward.

Shapes: M rows (all leading dims flattened), I in features, O out features.

    y = x @ wᵀ + b,   dx = dy @ w,   dw = dyᵀ @ x,   db = sum over rows of dy

The engine (MKL's ``torch.mm`` or oneDNN, see ``kernels.onednn_gemm``) is the one ``kernels.engines``
measured fastest for dense GEMMs here. A torch.library custom op with a fake kernel and an autograd
formula, so ``torch.compile`` sees one opaque node and never traces the engine choice. Anything that is
not CPU fp32, or too small to repay oneDNN's kernel compile (``onednn_gemm.MIN_DENSE_MACS``), goes to
``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.kernels import engines, onednn_gemm

_DENSE = {"mkl": torch.mm, "onednn": onednn_gemm.matmul}


def _matmul(a_MI: torch.Tensor, b_IO: torch.Tensor) -> torch.Tensor:
    """a @ b on the dense engine chosen for this machine."""
    return _DENSE[engines.current().dense](a_MI, b_IO)


@torch.library.custom_op("pure_reasoner::cpu_linear", mutates_args=())
def _linear_op(x_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    return _matmul(x_MI, w_OI.t())


@_linear_op.register_fake
def _(x_MI, w_OI):
    return x_MI.new_empty(x_MI.shape[0], w_OI.shape[0])


@torch.library.custom_op("pure_reasoner::cpu_linear_bwd", mutates_args=())
def _linear_bwd_op(dy_MO: torch.Tensor, x_MI: torch.Tensor, w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy_MO = dy_MO.contiguous()  # a stride-0 (expanded) upstream gradient is legal; oneDNN wants real strides
    return _matmul(dy_MO, w_OI), _matmul(dy_MO.t(), x_MI)


@_linear_bwd_op.register_fake
def _(dy_MO, x_MI, w_OI):
    return torch.empty_like(x_MI), torch.empty_like(w_OI)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_MO):
    return _linear_bwd_op(dy_MO, *ctx.saved_tensors)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(x_MI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """Same as ``F.linear(x, w, b)`` ([..., I] -> [..., O]); big CPU fp32 GEMMs on this machine's engine."""
    if not engines.cpu_fp32(x_MI, w_OI) or x_MI.numel() * w_OI.shape[0] < onednn_gemm.MIN_DENSE_MACS:
        return F.linear(x_MI, w_OI, b_O)
    y_MO = _linear_op(x_MI.reshape(-1, x_MI.shape[-1]), w_OI).view(*x_MI.shape[:-1], w_OI.shape[0])
    return y_MO if b_O is None else y_MO + b_O


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

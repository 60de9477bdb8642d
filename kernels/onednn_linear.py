"""``F.linear`` with its fp32 CPU GEMMs in oneDNN (see ``kernels.onednn_gemm`` for why), forward and backward.

Shapes: M rows (all leading dims flattened), I in features, O out features.

    y = x @ wᵀ + b,   dx = dy @ w,   dw = dyᵀ @ x,   db = sum over rows of dy

A torch.library custom op with a fake kernel and an autograd formula, so ``torch.compile`` sees one
opaque node. Anything oneDNN cannot take (other devices and dtypes) or that is too small to repay its
kernel compile (``onednn_gemm.MIN_DENSE_MACS``) goes to ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.kernels import onednn_gemm


@torch.library.custom_op("pure_reasoner::onednn_linear", mutates_args=())
def _linear_op(x_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    return onednn_gemm.matmul(x_MI, w_OI.t())


@_linear_op.register_fake
def _(x_MI, w_OI):
    return x_MI.new_empty(x_MI.shape[0], w_OI.shape[0])


@torch.library.custom_op("pure_reasoner::onednn_linear_bwd", mutates_args=())
def _linear_bwd_op(dy_MO: torch.Tensor, x_MI: torch.Tensor, w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy_MO = dy_MO.contiguous()  # a stride-0 (expanded) upstream gradient is legal; oneDNN wants real strides
    return onednn_gemm.matmul(dy_MO, w_OI), onednn_gemm.matmul(dy_MO.t(), x_MI)


@_linear_bwd_op.register_fake
def _(dy_MO, x_MI, w_OI):
    return torch.empty_like(x_MI), torch.empty_like(w_OI)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_MO):
    return _linear_bwd_op(dy_MO, *ctx.saved_tensors)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(x_MI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """Same as ``F.linear(x, w, b)`` ([..., I] -> [..., O]); oneDNN GEMMs for big enough CPU fp32 ones."""
    if not onednn_gemm.usable(x_MI, w_OI) or x_MI.numel() * w_OI.shape[0] < onednn_gemm.MIN_DENSE_MACS:
        return F.linear(x_MI, w_OI, b_O)
    y_MO = _linear_op(x_MI.reshape(-1, x_MI.shape[-1]), w_OI).view(*x_MI.shape[:-1], w_OI.shape[0])
    return y_MO if b_O is None else y_MO + b_O


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

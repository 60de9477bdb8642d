"""Knowledge-expert MLP, fast PyTorch path: sort by expert, grouped GEMMs on routed rows, scatter-add.

Shapes: T tokens, K slots per token, S = T*K slots, R rows processed, D model dim, F expert width,
E experts.

    y_TD[t] = sum over slots k with expert e = ids[t, k] != NOT_CONSULTED of
              gates[t, k] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e]

Two ways to bound the work, both dropless:
- compact (default on CPU): read the routed-row count on the host and process exactly those rows.
  On CPU that read is a load from host memory, not a device sync.
- masked (default elsewhere): process all S sorted slots with no host read; ``grouped_mm`` does no
  math past the last expert's offset, and ``torch.where`` keeps its unwritten rows (and their
  gradients) out of the result. Runs on the meta device, which proves it never reads a value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.routing import routing_metadata

_GROUPED_MM_ALIGN_BYTES = 16  # grouped_mm rejects row strides that are not a multiple of 16 bytes


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's CPU backward rejects an expanded (stride-0) gradient ("Invalid strides/sizes"), which
    is what ``y.sum().backward()`` sends; this is the seam where that is fixed.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(x_RI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    if x_RI.dtype not in _GROUPED_MM_DTYPES:
        return False
    itemsize = x_RI.element_size()
    return all((n * itemsize) % _GROUPED_MM_ALIGN_BYTES == 0 for n in (x_RI.shape[1], w_EIO.shape[2]))


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows ``[offsets[e-1], offsets[e])`` of x times ``w[e]``.

    Rows past ``offsets[-1]`` are left unwritten (garbage); callers mask or slice them away.
    Sizes that break grouped_mm's 16-byte stride rule (and float64) fall back to a loop over experts, which reads
    the offsets on the host (fine on CPU, a sync on GPU where the Triton path is the default).

    Args:
        x_RI: [R, I] rows sorted by expert.
        w_EIO: [E, I, O] weights.
        offsets_E: [E] int32 end offsets.

    Returns:
        [R, O]
    """
    if _grouped_mm_ok(x_RI, w_EIO):
        return _ContiguousGrad.apply(F.grouped_mm(x_RI, w_EIO, offs=offsets_E))
    outs, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        outs.append(x_RI[start:end] @ w_EIO[e])
        start = end
    outs.append(x_RI.new_zeros(x_RI.shape[0] - start, w_EIO.shape[2]))
    return torch.cat(outs)


def knowledge_mlp_torch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    compact: bool | None = None,
) -> torch.Tensor:
    """Weighted sum of the consulted experts' SwiGLU outputs per token (see module docstring).

    Args:
        x_TD: [T, D] tokens.
        expert_ids_TK: [T, K] int expert ids, ``NOT_CONSULTED`` (-1) for idle slots.
        gates_TK: [T, K] gate weights (ignored on idle slots).
        w1_EDF, w3_EDF: [E, D, F] gate and up projections.
        w2_EFD: [E, F, D] down projection.
        compact: process exactly the routed rows (host read of their count); default: on CPU.

    Returns:
        y_TD: [T, D], zero for tokens that consulted nothing.
    """
    meta = routing_metadata(expert_ids_TK, w1_EDF.shape[0])
    if compact is None:
        compact = x_TD.device.type == "cpu"
    if compact:
        num_rows = int(meta.num_routed)
        token_R, slot_R = meta.token_order_S[:num_rows], meta.slot_order_S[:num_rows]
        valid_R1 = None
    else:
        token_R, slot_R = meta.token_order_S, meta.slot_order_S
        rows_R = torch.arange(token_R.numel(), device=token_R.device)
        valid_R1 = (rows_R < meta.num_routed).unsqueeze(1)

    x_RD = x_TD.index_select(0, token_R)
    if valid_R1 is not None:
        x_RD = torch.where(valid_R1, x_RD, 0.0)
    h_RF = F.silu(grouped_matmul(x_RD, w1_EDF, meta.offsets_E)) * grouped_matmul(x_RD, w3_EDF, meta.offsets_E)
    y_RD = grouped_matmul(h_RF, w2_EFD, meta.offsets_E)
    y_RD = y_RD * gates_TK.reshape(-1).index_select(0, slot_R).to(y_RD.dtype).unsqueeze(1)
    if valid_R1 is not None:
        y_RD = torch.where(valid_R1, y_RD, 0.0)
    return torch.zeros_like(x_TD).index_add(0, token_R, y_RD)

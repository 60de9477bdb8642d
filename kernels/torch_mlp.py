"""Knowledge-expert MLP, fast PyTorch path: sort by expert, grouped GEMMs on routed rows, scatter-add.

Shapes: T tokens, K slots per token, S = T*K slots, R rows processed, D model dim, F expert width,
E experts.

    y_TD[t] = sum over slots k with expert e = ids[t, k] != NOT_CONSULTED of
              gates[t, k] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e]

Forward and backward are written out (a torch.library custom op each, with fake kernels), so the
backward costs exactly six grouped GEMMs, reuses the saved pre-activations, and ``torch.compile``
sees one opaque node either way:

    u = dy_R @ w2ᵀ,  dg = <u, h>,  dh = g * u,  dw2 = hᵀ (g * dy_R)
    da1 = silu'(a1) * a3 * dh,  da3 = silu(a1) * dh,  dw1 = x_Rᵀ da1,  dw3 = x_Rᵀ da3
    dx = scatter_add(da1 @ w1ᵀ + da3 @ w3ᵀ)

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

from kernels import onednn_gemm
from kernels.routing import expert_row_ranges, routing_metadata

_GROUPED_MM_ALIGN_BYTES = 16  # grouped_mm rejects row strides that are not a multiple of 16 bytes
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(dtype: torch.dtype, *dims: int) -> bool:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return dtype in _GROUPED_MM_DTYPES and all((n * itemsize) % _GROUPED_MM_ALIGN_BYTES == 0 for n in dims)


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows ``[offsets[e-1], offsets[e])`` of x times ``w[e]`` (w may be a transposed view).

    Rows past ``offsets[-1]`` are left unwritten (garbage); callers mask or slice them away.
    Sizes that break grouped_mm's 16-byte stride rule (and float64) fall back to a loop over experts, which
    reads the offsets on the host (fine on CPU, a sync on GPU where the Triton path is the default).

    Args:
        x_RI: [R, I] rows sorted by expert.
        w_EIO: [E, I, O] weights.
        offsets_E: [E] int32 end offsets.

    Returns:
        [R, O]
    """
    if onednn_gemm.grouped_worthwhile(x_RI, w_EIO.shape[1], w_EIO.shape[2]):
        return onednn_gemm.grouped_matmul(x_RI, w_EIO, offsets_E)
    if _grouped_mm_ok(x_RI.dtype, *x_RI.shape[1:], *w_EIO.shape[1:]):
        return F.grouped_mm(x_RI, w_EIO, offs=offsets_E)
    out_RO = x_RI.new_zeros(x_RI.shape[0], w_EIO.shape[2])
    for e, start, end in expert_row_ranges(offsets_E):
        torch.mm(x_RI[start:end], w_EIO[e], out=out_RO[start:end])
    return out_RO


def grouped_matmul_wgrad(a_RI: torch.Tensor, b_RO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per expert, the sum over its rows of ``a[r]ᵀ b[r]``: [E, I, O], zero for experts with no rows."""
    if onednn_gemm.grouped_worthwhile(a_RI, a_RI.shape[1], b_RO.shape[1]):
        return onednn_gemm.grouped_matmul_wgrad(a_RI, b_RO, offsets_E)
    if _grouped_mm_ok(a_RI.dtype, *a_RI.shape[1:], *b_RO.shape[1:]):
        return F.grouped_mm(a_RI.t(), b_RO, offs=offsets_E)
    out_EIO = a_RI.new_zeros(offsets_E.numel(), a_RI.shape[1], b_RO.shape[1])
    for e, start, end in expert_row_ranges(offsets_E):
        torch.mm(a_RI[start:end].t(), b_RO[start:end], out=out_EIO[e])
    return out_EIO


def _valid_rows(num_rows: int, offsets_E: torch.Tensor) -> torch.Tensor:
    """[R, 1] bool: sorted row r is routed (masked mode), computed on the device."""
    return (torch.arange(num_rows, device=offsets_E.device) < offsets_E[-1]).unsqueeze(1)


def mlp_forward(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_TD and what the backward needs: (y_TD, a1_RF, a3_RF, slot_R, offsets_E).

    R = routed rows (compact) or S (masked; rows past the routed count zero in a1/a3).
    """
    meta = routing_metadata(expert_ids_TK, w1_EDF.shape[0])
    num_rows = int(meta.num_routed) if compact else meta.slot_order_S.numel()
    slot_R = meta.slot_order_S[:num_rows]
    token_R = slot_R // expert_ids_TK.shape[1]
    x_RD = x_TD.index_select(0, token_R)
    a1_RF = grouped_matmul(x_RD, w1_EDF, meta.offsets_E)
    a3_RF = grouped_matmul(x_RD, w3_EDF, meta.offsets_E)
    if not compact:
        valid_R1 = _valid_rows(num_rows, meta.offsets_E)
        a1_RF, a3_RF = torch.where(valid_R1, a1_RF, 0.0), torch.where(valid_R1, a3_RF, 0.0)
    y_RD = grouped_matmul(F.silu(a1_RF) * a3_RF, w2_EFD, meta.offsets_E)
    y_RD = y_RD * gates_TK.reshape(-1).index_select(0, slot_R).to(y_RD.dtype).unsqueeze(1)
    if not compact:
        y_RD = torch.where(valid_R1, y_RD, 0.0)
    y_TD = torch.zeros_like(x_TD).index_add_(0, token_R, y_RD)
    return y_TD, a1_RF, a3_RF, slot_R, meta.offsets_E


def mlp_backward(
    dy_TD: torch.Tensor,
    x_TD: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    a1_RF: torch.Tensor,
    a3_RF: torch.Tensor,
    slot_R: torch.Tensor,
    offsets_E: torch.Tensor,
    compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx_TD, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD) from ``mlp_forward``'s saved tensors."""
    # The contiguity seam: ``y.sum().backward()`` sends an expanded (stride-0) dy, which grouped_mm's
    # CPU kernels reject ("Invalid strides/sizes").
    dy_TD = dy_TD.contiguous()
    token_R = slot_R // gates_TK.shape[1]
    valid_R1 = None if compact else _valid_rows(slot_R.numel(), offsets_E)
    gate_R1 = gates_TK.reshape(-1).index_select(0, slot_R).to(dy_TD.dtype).unsqueeze(1)
    dy_RD = dy_TD.index_select(0, token_R)
    silu_RF = F.silu(a1_RF)
    h_RF = silu_RF * a3_RF
    u_RF = grouped_matmul(dy_RD, w2_EFD.transpose(1, 2), offsets_E)
    if valid_R1 is not None:
        u_RF = torch.where(valid_R1, u_RF, 0.0)
    dgate_R = (u_RF * h_RF).sum(1)
    dw2_EFD = grouped_matmul_wgrad(h_RF, dy_RD * gate_R1, offsets_E)
    dh_RF = u_RF * gate_R1
    da3_RF = dh_RF * silu_RF
    da1_RF = torch.ops.aten.silu_backward(dh_RF * a3_RF, a1_RF)
    x_RD = x_TD.index_select(0, token_R)
    dw1_EDF = grouped_matmul_wgrad(x_RD, da1_RF, offsets_E)
    dw3_EDF = grouped_matmul_wgrad(x_RD, da3_RF, offsets_E)
    dx_RD = grouped_matmul(da1_RF, w1_EDF.transpose(1, 2), offsets_E)
    dx_RD += grouped_matmul(da3_RF, w3_EDF.transpose(1, 2), offsets_E)
    if valid_R1 is not None:
        dx_RD = torch.where(valid_R1, dx_RD, 0.0)
    dx_TD = torch.zeros_like(x_TD).index_add_(0, token_R, dx_RD)
    dgates_S = torch.zeros(gates_TK.numel(), dtype=gates_TK.dtype, device=gates_TK.device)
    dgates_S.index_copy_(0, slot_R, dgate_R.to(gates_TK.dtype))
    return dx_TD, dgates_S.view(gates_TK.shape), dw1_EDF, dw3_EDF, dw2_EFD


@torch.library.custom_op("pure_reasoner::torch_knowledge_mlp", mutates_args=())
def _mlp_op(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_forward(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact)


@_mlp_op.register_fake
def _(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact):
    # Compact mode processes as many rows as were routed: a size known only from the data.
    num_rows = torch.library.get_ctx().new_dynamic_size() if compact else expert_ids_TK.numel()
    width = w1_EDF.shape[2]
    return (
        torch.empty_like(x_TD),
        x_TD.new_empty(num_rows, width),
        x_TD.new_empty(num_rows, width),
        expert_ids_TK.new_empty(num_rows, dtype=torch.int64),
        expert_ids_TK.new_empty(w1_EDF.shape[0], dtype=torch.int32),
    )


@torch.library.custom_op("pure_reasoner::torch_knowledge_mlp_bwd", mutates_args=())
def _mlp_bwd_op(
    dy_TD: torch.Tensor,
    x_TD: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    a1_RF: torch.Tensor,
    a3_RF: torch.Tensor,
    slot_R: torch.Tensor,
    offsets_E: torch.Tensor,
    compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_backward(dy_TD, x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_RF, a3_RF, slot_R, offsets_E, compact)


@_mlp_bwd_op.register_fake
def _(dy_TD, x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_RF, a3_RF, slot_R, offsets_E, compact):
    return tuple(torch.empty_like(t) for t in (x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD))


def _setup_context(ctx, inputs, output):
    x_TD, _, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact = inputs
    _, a1_RF, a3_RF, slot_R, offsets_E = output
    ctx.mark_non_differentiable(a1_RF, a3_RF, slot_R, offsets_E)  # saved for backward, not results
    ctx.save_for_backward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_RF, a3_RF, slot_R, offsets_E)
    ctx.compact = compact
    # Compact mode with nothing routed (a row count known on the host; symbolic under torch.compile, where
    # this shortcut is skipped): every gradient is zero, so return none at all. Autograd then leaves the
    # experts' .grad untouched instead of writing 3 x [E, D, F] zeros.
    ctx.nothing_routed = compact and isinstance(a1_RF.shape[0], int) and a1_RF.shape[0] == 0


def _backward(ctx, dy_TD, *_saved_grads):
    if ctx.nothing_routed:
        return (None,) * 7
    dx_TD, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD = _mlp_bwd_op(dy_TD, *ctx.saved_tensors, ctx.compact)
    return dx_TD, None, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD, None


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


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
        y_TD: [T, D], zero for tokens that consulted nothing. Differentiable in x, gates and weights.
    """
    if compact is None:
        compact = x_TD.device.type == "cpu"
    y_TD, *_ = _mlp_op(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact)
    return y_TD


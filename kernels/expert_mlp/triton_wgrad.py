"""Grouped weight gradient in Triton: for every expert, dW[e] = A_eᵀ · B_e over that expert's rows.

Shapes: R = S sorted rows (only the first ``offsets[-1]`` are routed), I/O the weight's in/out dims,
E experts. A row of A or B is read either at its sorted position or, "gathered", at its token
(``slot_order[r] // K``), so neither operand is ever materialised in sorted order; B's rows can be
scaled by the slot's gate. Used by both backward passes:

    dW1[e] = Σ_r x[token_r]ᵀ · da1[r]        (A gathered)
    dW2[e] = Σ_r h[r]ᵀ · (gate_r · dy[token_r])  (B gathered and scaled)

One program per (expert, I block, O block) loops over the expert's rows: the grid depends only on
shapes, and an expert with no rows writes zeros. The (I, O) blocks of one expert are walked GROUP_I
I blocks at a time down every O block (``kernels.triton_schedule.swizzle``), and an expert's programs
run one after another (the expert is the grid's slow axis), so its rows stay in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pure_reasoner.kernels.triton_schedule import WGRAD_TILES, dot_precision, launch, row_bucket, swizzle


@WGRAD_TILES.autotune(key=["DIM_IN", "DIM_OUT"])
@triton.jit(do_not_specialize=["row_bucket"])
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, slot_order_ptr, scale_ptr, offsets_ptr, dw_ptr,
    num_slots_per_token, DIM_IN, DIM_OUT, stride_a, stride_b, stride_de, stride_di, row_bucket,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_I: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(1)
    pid_i, pid_o = swizzle(tl.cdiv(DIM_IN, BLOCK_I), tl.cdiv(DIM_OUT, BLOCK_O), GROUP_I)
    row_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(offsets_ptr + expert)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        slots = tl.load(slot_order_ptr + rows, mask=row_mask, other=0)
        tokens = slots // num_slots_per_token
        a_rows = tokens if A_GATHER else rows.to(tl.int64)
        b_rows = tokens if B_GATHER else rows.to(tl.int64)
        a_mask = row_mask[:, None] & (ii < DIM_IN)[None, :]
        b_mask = row_mask[:, None] & (oo < DIM_OUT)[None, :]
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ii[None, :], mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + oo[None, :], mask=b_mask, other=0.0)
        if SCALE:
            gate = tl.load(scale_ptr + slots, mask=row_mask, other=0.0)
            b = (b.to(tl.float32) * gate[:, None]).to(b.dtype)
        acc += tl.dot(tl.trans(a), b, input_precision=DOT_PRECISION)
    mask = (ii < DIM_IN)[:, None] & (oo < DIM_OUT)[None, :]
    dw = dw_ptr + expert.to(tl.int64) * stride_de + ii[:, None] * stride_di + oo[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask)


def grouped_wgrad(
    a_RI: torch.Tensor,
    b_RO: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    num_slots_per_token: int,
    a_gather: bool,
    b_gather: bool,
    scale_S: torch.Tensor | None = None,
    deterministic: bool = False,
    tf32: bool = False,
) -> torch.Tensor:
    """dW_EIO[e] = Σ over expert e's sorted rows r of A[r]ᵀ · (scale · B[r]).

    Args:
        a_RI, b_RO: row-major operands; a gathered operand is indexed by token ([T, ·]), the other by
            sorted row ([S, ·]).
        slot_order_S: [S] int64 flat slot of each sorted row; offsets_E: [E] int32 end offsets.
        num_slots_per_token: K (token = slot // K).
        a_gather, b_gather: read that operand's rows at the token instead of the sorted row.
        scale_S: optional [S] fp32 per-slot scale of B's rows (the gates, flat).
        deterministic: pin the launch config (``kernels.triton_schedule.launch``).
        tf32: fp32 dots in TF32 (``kernels.triton_schedule.dot_precision``).

    Returns:
        [E, I, O] in a's dtype; zero for experts with no rows.
    """
    a_RI, b_RO = a_RI.contiguous(), b_RO.contiguous()
    num_experts, dim_in, dim_out = offsets_E.numel(), a_RI.shape[1], b_RO.shape[1]
    dw_EIO = torch.empty(num_experts, dim_in, dim_out, dtype=a_RI.dtype, device=a_RI.device)
    scale = scale_S if scale_S is not None else slot_order_S  # never read when SCALE is off

    def grid(meta):
        return (triton.cdiv(dim_in, meta["BLOCK_I"]) * triton.cdiv(dim_out, meta["BLOCK_O"]), num_experts)

    launch(
        _grouped_wgrad_kernel, grid, a_RI, b_RO, slot_order_S, scale, offsets_E, dw_EIO,
        num_slots_per_token, dim_in, dim_out, a_RI.stride(0), b_RO.stride(0), dw_EIO.stride(0), dw_EIO.stride(1),
        row_bucket(slot_order_S.numel()), deterministic=deterministic, A_GATHER=a_gather, B_GATHER=b_gather,
        SCALE=scale_S is not None, DOT_PRECISION=dot_precision(a_RI.dtype, tf32),
    )  # fmt: skip
    return dw_EIO

"""Grouped down projection + gate-weighted scatter-add in Triton, forward and backward.

Shapes: T tokens, K slots per token, S = T*K sorted rows (the first R = offsets[-1] routed), D model
dim, F expert width, E experts. Row r belongs to flat slot ``s_r = slot_order[r]``, token ``s_r // K``.

    forward:   y[t] = Σ_{r: token_r = t} g[s_r] · h[r] @ w2[e_r]      (atomic scatter-add, or per row + combine)
    backward:  u[r] = dy[token_r] @ w2[e_r]ᵀ     (dy read by token: no permuted copy)
               dh[r] = g[s_r] · u[r],  dg[s_r] = <u[r], h[r]>
               dw2[e] = Σ_{r in e} h[r]ᵀ (g[s_r] · dy[token_r])                   (kernels.triton_wgrad)

The output accumulates in fp32 and is cast to h's dtype once. Idle rows of dh are written as zeros by
the grid's left-over programs; idle slots get a zero gate gradient.

Deterministic mode (``PER_ROW``) uses no atomics: the forward writes each row's gate-weighted output at its
sorted position and ``kernels.combine`` sums a token's slots in slot order; the gate gradient's partial
sums over F blocks go to one row each of a [F blocks, S] buffer, summed afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backends import check_triton
from kernels.combine import combine_rows
from kernels.triton_schedule import configs, dot_precision, expert_row_block, launch, padded, row_blocks
from kernels.triton_wgrad import grouped_wgrad

_CONFIGS = configs(
    gpu=[
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8),
    ],
    interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
)


@triton.autotune(configs=_CONFIGS, key=["D", "F"], reset_to_zero=["y_ptr"])
@triton.jit
def _down_scatter_fwd_kernel(
    h_ptr, gates_ptr, slot_order_ptr, offsets_ptr, w2_ptr, y_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # BLOCK_N tiles D (the output), BLOCK_K tiles F (the reduction). PER_ROW: y is [S, D] by sorted row.
    expert, rows, row_mask = expert_row_block(offsets_ptr, num_experts, num_slots, BLOCK_M, P)
    if expert >= num_experts:
        return
    slots = tl.load(slot_order_ptr + rows, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * F + kk[None, :], mask=row_mask[:, None] & (kk < F)[None, :], other=0.0)
        w_offs = w_base + kk[:, None] * D + cols[None, :]
        w = tl.load(w2_ptr + w_offs, mask=(kk < F)[:, None] & (cols < D)[None, :], other=0.0)
        acc += tl.dot(h, w, input_precision=DOT_PRECISION)
    gate = tl.load(gates_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    out_mask = row_mask[:, None] & (cols < D)[None, :]
    if PER_ROW:
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc * gate[:, None], mask=out_mask)
    else:
        tokens = slots // num_slots_per_token
        tl.atomic_add(y_ptr + tokens[:, None] * D + cols[None, :], acc * gate[:, None], mask=out_mask)


@triton.autotune(configs=_CONFIGS, key=["D", "F"], reset_to_zero=["dgates_ptr"])
@triton.jit
def _down_scatter_bwd_kernel(
    dy_ptr, h_ptr, gates_ptr, slot_order_ptr, offsets_ptr, w2_ptr, dh_ptr, dgates_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # BLOCK_N tiles F (the output dh), BLOCK_K tiles D (the reduction). PER_ROW: dgates is [F blocks, S].
    expert, rows, row_mask = expert_row_block(offsets_ptr, num_experts, num_slots, BLOCK_M, P)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out = rows[:, None] * F + cols[None, :]
    out_mask = row_mask[:, None] & (cols < F)[None, :]
    if expert >= num_experts:
        tl.store(dh_ptr + out, tl.zeros((BLOCK_M, BLOCK_N), dtype=dh_ptr.dtype.element_ty), mask=out_mask)
        return
    slots = tl.load(slot_order_ptr + rows, mask=row_mask, other=0)
    tokens = slots // num_slots_per_token
    w_base = expert.to(tl.int64) * stride_we
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        dy_mask = row_mask[:, None] & (kk < D)[None, :]
        dy = tl.load(dy_ptr + tokens[:, None] * D + kk[None, :], mask=dy_mask, other=0.0)
        # w2[e]ᵀ tile [BLOCK_K of D, BLOCK_N of F], read straight from the [E, F, D] layout.
        w_mask = (kk < D)[:, None] & (cols < F)[None, :]
        w = tl.load(w2_ptr + w_base + cols[None, :] * D + kk[:, None], mask=w_mask, other=0.0)
        u += tl.dot(dy, w, input_precision=DOT_PRECISION)
    h = tl.load(h_ptr + out, mask=out_mask, other=0.0).to(tl.float32)
    if PER_ROW:
        tl.store(dgates_ptr + tl.program_id(1) * num_slots + slots, tl.sum(u * h, axis=1), mask=row_mask)
    else:
        tl.atomic_add(dgates_ptr + slots, tl.sum(u * h, axis=1), mask=row_mask)
    gate = tl.load(gates_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + out, (u * gate[:, None]).to(dh_ptr.dtype.element_ty), mask=out_mask)


def _check(h_SF: torch.Tensor, gates_TK: torch.Tensor, slot_order_S, offsets_E, w2_EFD: torch.Tensor) -> None:
    check_triton(h_SF, w2_EFD)
    if slot_order_S.dtype != torch.int64 or offsets_E.dtype != torch.int32:
        raise ValueError(f"slot_order_S must be int64 and offsets_E int32, got {slot_order_S.dtype}, {offsets_E.dtype}")
    if gates_TK.numel() != h_SF.shape[0] or w2_EFD.shape[1] != h_SF.shape[1] or w2_EFD.dtype != h_SF.dtype:
        raise ValueError(
            f"h {tuple(h_SF.shape)} {h_SF.dtype}, gates {tuple(gates_TK.shape)} and w2 {tuple(w2_EFD.shape)} "
            f"{w2_EFD.dtype} do not fit"
        )


def down_scatter_fwd(
    h_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
    deterministic: bool = False,
) -> torch.Tensor:
    """Launch the forward. Returns y_TD in h's dtype; ``deterministic``: combined in slot order."""
    _check(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)
    h_SF, gates_S, w2_EFD = h_SF.contiguous(), gates_TK.reshape(-1).contiguous(), w2_EFD.contiguous()
    (num_tokens, top_k), (num_experts, width, dim) = gates_TK.shape, w2_EFD.shape
    # fp32 accumulator: atomic, by token; or deterministic, by sorted row (idle rows stay zero)
    y_out = torch.zeros(h_SF.shape[0] if deterministic else num_tokens, dim, dtype=torch.float32, device=h_SF.device)

    def grid(meta):
        return (row_blocks(h_SF.shape[0], num_experts, meta["BLOCK_M"]), triton.cdiv(dim, meta["BLOCK_N"]))

    launch(
        _down_scatter_fwd_kernel, grid, h_SF, gates_S, slot_order_S, offsets_E, w2_EFD, y_out,
        num_experts, h_SF.shape[0], top_k, dim, width, w2_EFD.stride(0),
        deterministic=deterministic, P=padded(num_experts), DOT_PRECISION=dot_precision(h_SF.dtype),
        PER_ROW=deterministic,
    )  # fmt: skip
    if deterministic:
        y_out = combine_rows(y_out, slot_order_S, num_tokens, top_k, deterministic=True)
    return y_out.to(h_SF.dtype)


def down_scatter_bwd(
    dy_TD: torch.Tensor,
    h_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dh_SF, dgates_TK (gates' dtype), dw2_EFD; ``deterministic``: no atomics."""
    _check(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)
    dy_TD, h_SF, w2_EFD = dy_TD.to(h_SF.dtype).contiguous(), h_SF.contiguous(), w2_EFD.contiguous()
    gates_S = gates_TK.reshape(-1).contiguous()
    top_k, (num_experts, width, dim) = gates_TK.shape[1], w2_EFD.shape
    dh_SF = torch.empty_like(h_SF)
    # fp32 accumulator: atomic over F blocks; or deterministic, one row per F block of the pinned config
    num_partials = triton.cdiv(width, _down_scatter_bwd_kernel.configs[0].kwargs["BLOCK_N"]) if deterministic else 1
    dgates_PS = torch.zeros(num_partials, gates_S.numel(), dtype=torch.float32, device=h_SF.device)

    def grid(meta):
        return (row_blocks(h_SF.shape[0], num_experts, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]))

    launch(
        _down_scatter_bwd_kernel, grid, dy_TD, h_SF, gates_S, slot_order_S, offsets_E, w2_EFD, dh_SF, dgates_PS,
        num_experts, h_SF.shape[0], top_k, dim, width, w2_EFD.stride(0),
        deterministic=deterministic, P=padded(num_experts), DOT_PRECISION=dot_precision(h_SF.dtype),
        PER_ROW=deterministic,
    )  # fmt: skip
    dw2_EFD = grouped_wgrad(
        h_SF, dy_TD, slot_order_S, offsets_E, top_k, a_gather=False, b_gather=True, scale_S=gates_S.float(),
        deterministic=deterministic,
    )
    return dh_SF, dgates_PS.sum(0).to(gates_TK.dtype).view(gates_TK.shape), dw2_EFD


@torch.library.custom_op("pure_reasoner::triton_down_scatter", mutates_args=())
def _down_scatter_op(
    h_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    return down_scatter_fwd(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)


@_down_scatter_op.register_fake
def _(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD):
    return h_SF.new_empty(gates_TK.shape[0], w2_EFD.shape[2])


@torch.library.custom_op("pure_reasoner::triton_down_scatter_bwd", mutates_args=())
def _down_scatter_bwd_op(
    dy_TD: torch.Tensor,
    h_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return down_scatter_bwd(dy_TD, h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)


@_down_scatter_bwd_op.register_fake
def _(dy_TD, h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD):
    return torch.empty_like(h_SF), torch.empty_like(gates_TK), torch.empty_like(w2_EFD)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_TD):
    h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD = ctx.saved_tensors
    dh_SF, dgates_TK, dw2_EFD = _down_scatter_bwd_op(dy_TD, h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)
    return dh_SF, dgates_TK, None, None, dw2_EFD


_down_scatter_op.register_autograd(_backward, setup_context=_setup_context)


def down_scatter(
    h_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """y[t] = Σ over t's routed rows of gate · h[r] @ w2[e_r]; differentiable in h, gates, w2.

    Args:
        h_SF: [S, F] expert activations in sorted-row order (``kernels.triton_up.gather_swiglu``).
        gates_TK: [T, K] gate weights (read only on routed slots).
        slot_order_S: [S] int64; offsets_E: [E] int32 end offsets (``kernels.routing_metadata``).
        w2_EFD: [E, F, D] down projections.

    Returns:
        y_TD: [T, D] in h's dtype; zero for tokens that consulted nothing.
    """
    return _down_scatter_op(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)

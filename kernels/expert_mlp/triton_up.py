"""Fused gather + grouped up/gate GEMM + SwiGLU in Triton, forward and backward.

Shapes: T tokens, K slots per token, S = T*K sorted rows (the first R = offsets[-1] routed), D model
dim, F expert width, E experts. Row r belongs to flat slot ``slot_order[r]`` and token ``slot // K``.

    forward:   a1[r] = x[token_r] @ w1[e_r],  a3[r] = x[token_r] @ w3[e_r],  h[r] = silu(a1[r]) * a3[r]
    backward:  da1 = dh * a3 * silu'(a1),  da3 = dh * silu(a1)                          (``swiglu_grads``)
               dx[t] = Σ_{r: token_r = t} da1[r] @ w1[e_r]ᵀ + da3[r] @ w3[e_r]ᵀ   (atomic scatter-add,
                                                                      or per row + kernels.expert_mlp.combine)
               dw1[e] = Σ_{r in e} x[token_r]ᵀ da1[r],  dw3 likewise           (kernels.expert_mlp.triton_wgrad)

The backward kernel starts from da1, da3: the fused knowledge MLP computes them once, in the epilogue
of the down projection's backward (``kernels.expert_mlp.triton_down``, where dh is already in registers), not in
every D block of this kernel. The standalone op here gets dh from autograd and runs ``swiglu_grads``
as one elementwise pass first.

Rows of x are read by token index: no permuted copy of x exists. Idle rows (r >= R) of h (and of the
saved a1, a3) are written as zeros by the programs left over from the grid's upper bound, so the
outputs are fully defined without reading R on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pure_reasoner.kernels.backends import check_triton
from pure_reasoner.kernels.expert_mlp.combine import combine_rows
from pure_reasoner.kernels.expert_mlp.triton_tiles import (
    expert_tile,
    out_tile,
    row_tile,
    store_by_row_or_token,
    weight_tile_offsets,
)
from pure_reasoner.kernels.expert_mlp.triton_wgrad import grouped_wgrad
from pure_reasoner.kernels.routing.metadata import check_sorted_rows
from pure_reasoner.kernels.triton_schedule import (
    ROW_GEMM_TILES,
    dot_precision,
    launch,
    padded,
    row_blocks,
    row_bucket,
)


@triton.jit
def swiglu_grads(dh, a1, a3):
    """(da1, da3) of h = silu(a1) * a3 for the incoming dh, all fp32 tiles of one shape."""
    sig = tl.sigmoid(a1)
    return dh * a3 * sig * (1.0 + a1 * (1.0 - sig)), dh * a1 * sig


@ROW_GEMM_TILES.autotune(key=["D", "F"])
@triton.jit(do_not_specialize=["row_bucket"])
def _gather_swiglu_fwd_kernel(
    x_ptr, slot_order_ptr, offsets_ptr, w1_ptr, w3_ptr, h_ptr, a1_ptr, a3_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we, row_bucket,
    SAVE_PREACT: tl.constexpr, P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    expert, rows, row_mask, _, cols, slots, w_base = expert_tile(offsets_ptr, slot_order_ptr, num_experts, num_slots,
                                                                 F, stride_we, BLOCK_M, BLOCK_N, GROUP_M, P)
    out, out_mask = out_tile(rows, row_mask, cols, F)
    if expert >= num_experts:
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=h_ptr.dtype.element_ty)
        tl.store(h_ptr + out, zeros, mask=out_mask)
        if SAVE_PREACT:
            tl.store(a1_ptr + out, zeros, mask=out_mask)
            tl.store(a3_ptr + out, zeros, mask=out_mask)
        return
    tokens = slots // num_slots_per_token
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):  # the two GEMMs share each x tile
        kk = k0 + tl.arange(0, BLOCK_K)
        x = row_tile(x_ptr, tokens, row_mask, kk, D)
        w_offs, w_mask = weight_tile_offsets(w_base, kk, cols, D, F, False)
        acc1 += tl.dot(x, tl.load(w1_ptr + w_offs, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        acc3 += tl.dot(x, tl.load(w3_ptr + w_offs, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
    h = acc1 * tl.sigmoid(acc1) * acc3
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_PREACT:
        tl.store(a1_ptr + out, acc1.to(a1_ptr.dtype.element_ty), mask=out_mask)
        tl.store(a3_ptr + out, acc3.to(a3_ptr.dtype.element_ty), mask=out_mask)


@ROW_GEMM_TILES.autotune(key=["D", "F"], reset_to_zero=["dx_ptr"])
@triton.jit(do_not_specialize=["row_bucket"])
def _gather_swiglu_bwd_kernel(
    da1_ptr, da3_ptr, slot_order_ptr, offsets_ptr, w1_ptr, w3_ptr, dx_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we, row_bucket,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Here BLOCK_N tiles D (the output dx) and BLOCK_K tiles F (the reduction). PER_ROW: dx is [S, D] by
    # sorted row, combined afterwards (no atomics).
    expert, rows, row_mask, _, cols, _, w_base = expert_tile(offsets_ptr, slot_order_ptr, num_experts, num_slots, D,
                                                             stride_we, BLOCK_M, BLOCK_N, GROUP_M, P)
    if expert >= num_experts:
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):  # one sum over both GEMMs, da1 @ w1ᵀ then da3 @ w3ᵀ per F block
        kk = k0 + tl.arange(0, BLOCK_K)
        w_offs, w_mask = weight_tile_offsets(w_base, kk, cols, F, D, True)
        da1 = row_tile(da1_ptr, rows, row_mask, kk, F)
        acc += tl.dot(da1, tl.load(w1_ptr + w_offs, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        da3 = row_tile(da3_ptr, rows, row_mask, kk, F)
        acc += tl.dot(da3, tl.load(w3_ptr + w_offs, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
    # The slots are read after the loop (and only when scattering by token): no registers held through it.
    tokens = tl.load(slot_order_ptr + rows, mask=row_mask, other=0) // num_slots_per_token
    store_by_row_or_token(dx_ptr, acc, rows, tokens, row_mask, cols, D, PER_ROW)


@triton.jit
def _swiglu_grads_kernel(dh_ptr, a1_ptr, a3_ptr, da1_ptr, da3_ptr, num_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a1 = tl.load(a1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a3 = tl.load(a3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    da1, da3 = swiglu_grads(dh, a1, a3)
    tl.store(da1_ptr + offs, da1.to(da1_ptr.dtype.element_ty), mask=mask)
    tl.store(da3_ptr + offs, da3.to(da3_ptr.dtype.element_ty), mask=mask)


def _check(x_TD: torch.Tensor, slot_order_S: torch.Tensor, offsets_E: torch.Tensor, *weights: torch.Tensor) -> None:
    check_triton(x_TD, *weights)
    check_sorted_rows(slot_order_S, offsets_E)
    for w in weights:
        if w.shape != weights[0].shape or w.dtype != x_TD.dtype:
            raise ValueError(f"w1/w3 must share shape and x's dtype, got {tuple(w.shape)} {w.dtype}")
    if weights[0].shape[0] != offsets_E.numel() or weights[0].shape[1] != x_TD.shape[1]:
        raise ValueError(f"weights {tuple(weights[0].shape)} do not fit x {tuple(x_TD.shape)}, E={offsets_E.numel()}")


def gather_swiglu_fwd(
    x_TD: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    num_slots_per_token: int,
    save_preact: bool,
    deterministic: bool = False,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns h_SF and, if ``save_preact``, a1_SF and a3_SF (else [0, F] each).

    S here is the length of ``slot_order_S``: any window of the sorted rows, with offsets relative to it.
    ``tf32``: fp32 dots on tensor cores in TF32 (``kernels.triton_schedule.dot_precision``).
    """
    _check(x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF)
    x_TD, w1_EDF, w3_EDF = x_TD.contiguous(), w1_EDF.contiguous(), w3_EDF.contiguous()
    num_slots, (num_experts, dim, width) = slot_order_S.numel(), w1_EDF.shape
    h_SF = x_TD.new_empty(num_slots, width)
    a1_SF, a3_SF = (x_TD.new_empty(num_slots if save_preact else 0, width) for _ in range(2))

    def grid(meta):
        return (row_blocks(num_slots, num_experts, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    launch(
        _gather_swiglu_fwd_kernel, grid, x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, h_SF, a1_SF, a3_SF,
        num_experts, num_slots, num_slots_per_token, dim, width, w1_EDF.stride(0), row_bucket(num_slots),
        deterministic=deterministic, SAVE_PREACT=save_preact, P=padded(num_experts),
        DOT_PRECISION=dot_precision(x_TD.dtype, tf32),
    )  # fmt: skip
    return h_SF, a1_SF, a3_SF


def swiglu_grads_rows(
    dh_SF: torch.Tensor, a1_SF: torch.Tensor, a3_SF: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """da1_SF, da3_SF of h = silu(a1) * a3 for dh_SF, elementwise in fp32 (all [S, F], dh's dtype)."""
    if a1_SF.shape != dh_SF.shape or a3_SF.shape != dh_SF.shape:
        raise ValueError(f"backward needs the saved a1/a3 of shape {tuple(dh_SF.shape)}, got {tuple(a1_SF.shape)}")
    dh_SF, a1_SF, a3_SF = dh_SF.contiguous(), a1_SF.contiguous(), a3_SF.contiguous()
    da1_SF, da3_SF = torch.empty_like(dh_SF), torch.empty_like(dh_SF)
    block = 1024
    if dh_SF.numel():
        launch(_swiglu_grads_kernel, (triton.cdiv(dh_SF.numel(), block),), dh_SF, a1_SF, a3_SF, da1_SF, da3_SF,
               dh_SF.numel(), deterministic=False, BLOCK=block)
    return da1_SF, da3_SF


def gather_swiglu_bwd(
    da1_SF: torch.Tensor,
    da3_SF: torch.Tensor,
    x_TD: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    num_slots_per_token: int,
    deterministic: bool = False,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward from the pre-activation gradients. Returns dx_TD, dw1_EDF, dw3_EDF.

    Args:
        da1_SF, da3_SF: [S, F] gradients of a1 = x @ w1 and a3 = x @ w3 per sorted row (rows of idle
            slots are never read).
        deterministic: dx combined in slot order (no atomics), configs pinned.
        tf32: fp32 dots in TF32.
    """
    _check(x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF)
    width = w1_EDF.shape[2]
    if da1_SF.shape != (slot_order_S.numel(), width) or da3_SF.shape != da1_SF.shape:
        raise ValueError(f"da1/da3 must be [S={slot_order_S.numel()}, F={width}], got {tuple(da1_SF.shape)}, "
                         f"{tuple(da3_SF.shape)}")
    x_TD, w1_EDF, w3_EDF = x_TD.contiguous(), w1_EDF.contiguous(), w3_EDF.contiguous()
    da1_SF, da3_SF = da1_SF.to(x_TD.dtype).contiguous(), da3_SF.to(x_TD.dtype).contiguous()
    num_slots, (num_experts, dim, _) = slot_order_S.numel(), w1_EDF.shape
    # fp32 accumulator: atomic, by token; or deterministic, by sorted row (idle rows stay zero)
    dx_out = torch.zeros(num_slots if deterministic else x_TD.shape[0], dim, dtype=torch.float32, device=x_TD.device)

    def grid(meta):
        return (row_blocks(num_slots, num_experts, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]),)

    launch(
        _gather_swiglu_bwd_kernel, grid, da1_SF, da3_SF, slot_order_S, offsets_E, w1_EDF, w3_EDF, dx_out,
        num_experts, num_slots, num_slots_per_token, dim, width, w1_EDF.stride(0), row_bucket(num_slots),
        deterministic=deterministic, P=padded(num_experts), DOT_PRECISION=dot_precision(x_TD.dtype, tf32),
        PER_ROW=deterministic,
    )  # fmt: skip
    if deterministic:
        dx_out = combine_rows(dx_out, slot_order_S, x_TD.shape[0], num_slots_per_token, deterministic=True)
    wgrad = dict(a_gather=True, b_gather=False, deterministic=deterministic, tf32=tf32)
    dw1_EDF = grouped_wgrad(x_TD, da1_SF, slot_order_S, offsets_E, num_slots_per_token, **wgrad)
    dw3_EDF = grouped_wgrad(x_TD, da3_SF, slot_order_S, offsets_E, num_slots_per_token, **wgrad)
    return dx_out.to(x_TD.dtype), dw1_EDF, dw3_EDF


_gather_swiglu_op = torch.library.custom_op("pure_reasoner::triton_gather_swiglu", gather_swiglu_fwd, mutates_args=())


@_gather_swiglu_op.register_fake
def _(x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, num_slots_per_token, save_preact, deterministic=False,
      tf32=False):
    num_slots, width = slot_order_S.shape[0], w1_EDF.shape[2]
    saved = num_slots if save_preact else 0
    return x_TD.new_empty(num_slots, width), x_TD.new_empty(saved, width), x_TD.new_empty(saved, width)


@torch.library.custom_op("pure_reasoner::triton_gather_swiglu_bwd", mutates_args=())
def _gather_swiglu_bwd_op(
    dh_SF: torch.Tensor,
    x_TD: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    a1_SF: torch.Tensor,
    a3_SF: torch.Tensor,
    num_slots_per_token: int,
    deterministic: bool = False,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gather_swiglu_fwd``'s backward from dh: the SwiGLU's backward, then ``gather_swiglu_bwd``."""
    check_triton(dh_SF, a1_SF, a3_SF)
    da1_SF, da3_SF = swiglu_grads_rows(dh_SF, a1_SF, a3_SF)
    return gather_swiglu_bwd(da1_SF, da3_SF, x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, num_slots_per_token,
                             deterministic, tf32)


@_gather_swiglu_bwd_op.register_fake
def _(dh_SF, x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, a1_SF, a3_SF, num_slots_per_token, deterministic=False,
      tf32=False):
    # new_empty, not empty_like: the real op returns contiguous tensors whatever the inputs' strides.
    return x_TD.new_empty(x_TD.shape), w1_EDF.new_empty(w1_EDF.shape), w3_EDF.new_empty(w3_EDF.shape)


def _setup_context(ctx, inputs, output):
    x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, num_slots_per_token, _, deterministic, tf32 = inputs
    _, a1_SF, a3_SF = output
    ctx.mark_non_differentiable(a1_SF, a3_SF)  # saved pre-activations, not results
    ctx.save_for_backward(x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, a1_SF, a3_SF)
    ctx.num_slots_per_token, ctx.deterministic, ctx.tf32 = num_slots_per_token, deterministic, tf32


def _backward(ctx, dh_SF, _da1, _da3):
    dx_TD, dw1_EDF, dw3_EDF = _gather_swiglu_bwd_op(
        dh_SF, *ctx.saved_tensors, ctx.num_slots_per_token, ctx.deterministic, ctx.tf32
    )
    return dx_TD, None, None, dw1_EDF, dw3_EDF, None, None, None, None


_gather_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def gather_swiglu(
    x_TD: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    num_slots_per_token: int,
) -> torch.Tensor:
    """h = silu(x @ w1) * (x @ w3) for every routed row, x read by token; differentiable in x, w1, w3.

    Args:
        x_TD: [T, D] tokens (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        slot_order_S: [S] int64 flat slot of each sorted row; offsets_E: [E] int32 end offsets
            (``kernels.routing_metadata``).
        w1_EDF, w3_EDF: [E, D, F] gate and up projections.
        num_slots_per_token: K.

    Returns:
        h_SF: [S, F] in sorted-row order; rows past the routed count are zero.
    """
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w1_EDF, w3_EDF))
    h_SF, _, _ = _gather_swiglu_op(x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, num_slots_per_token, save)
    return h_SF

"""Grouped down projection + gate-weighted scatter-add in Triton, forward and backward.

Shapes: T tokens, K slots per token, S = T*K sorted rows (the first R = offsets[-1] routed), D model
dim, F expert width, E experts. Row r belongs to flat slot ``s_r = slot_order[r]``, token ``s_r // K``.

    forward:   y[t] = Σ_{r: token_r = t} g[s_r] · h[r] @ w2[e_r]      (atomic scatter-add, or per row + combine)
    backward:  u[r] = dy[token_r] @ w2[e_r]ᵀ     (dy read by token: no permuted copy)
               dh[r] = g[s_r] · u[r],  dg[s_r] = <u[r], h[r]>
               dw2[e] = Σ_{r in e} h[r]ᵀ (g[s_r] · dy[token_r])                   (kernels.expert_mlp.triton_wgrad)

The backward has two kernels around one main loop. Standalone (h given): it writes dh. Fused into the
knowledge MLP (``down_swiglu_bwd``, a1 and a3 given): it recomputes h = silu(a1) * a3 from the saved
pre-activations, writes h (for dw2) and the SwiGLU backward da1, da3 (``kernels.expert_mlp.triton_up.swiglu_grads``)
while dh is still in registers, so the up projection's backward reads da1, da3 once instead of
recomputing them per D block.

The output accumulates in fp32 and is cast to h's dtype once. Idle rows of dh are written as zeros by
the grid's left-over programs; idle slots get a zero gate gradient. The fused epilogue's outputs are
internal (read only on routed rows) and left unwritten on idle rows.

Deterministic mode (``PER_ROW``) uses no atomics: the forward writes each row's gate-weighted output at its
sorted position and ``kernels.expert_mlp.combine`` sums a token's slots in slot order; the gate gradient's partial
sums over F blocks go to one row each of a [F blocks, S] buffer, summed afterwards.
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
    rows_times_weight,
    store_by_row_or_token,
)
from pure_reasoner.kernels.expert_mlp.triton_up import swiglu_grads
from pure_reasoner.kernels.expert_mlp.triton_wgrad import grouped_wgrad
from pure_reasoner.kernels.routing.metadata import check_sorted_rows
from pure_reasoner.kernels.triton_schedule import (
    ROW_GEMM_TILES,
    SWIGLU_BWD_TILES,
    dot_precision,
    launch,
    padded,
    pinned_config,
    row_blocks,
    row_bucket,
)


@ROW_GEMM_TILES.autotune(key=["D", "F"], reset_to_zero=["y_ptr"])
@triton.jit(do_not_specialize=["row_bucket"])
def _down_scatter_fwd_kernel(
    h_ptr, gates_ptr, slot_order_ptr, offsets_ptr, w2_ptr, y_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we, row_bucket,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # BLOCK_N tiles D (the output), BLOCK_K tiles F (the reduction). PER_ROW: y is [S, D] by sorted row.
    expert, rows, row_mask, _, cols, slots, w_base = expert_tile(offsets_ptr, slot_order_ptr, num_experts, num_slots,
                                                                 D, stride_we, BLOCK_M, BLOCK_N, GROUP_M, P)
    if expert >= num_experts:
        return
    acc = rows_times_weight(h_ptr, w2_ptr, w_base, rows, row_mask, cols, F, D, False, DOT_PRECISION, BLOCK_M,
                            BLOCK_N, BLOCK_K)
    gate = tl.load(gates_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    store_by_row_or_token(y_ptr, acc * gate[:, None], rows, slots // num_slots_per_token, row_mask, cols, D, PER_ROW)


@triton.jit
def _gate_grad(u, h, slots, row_mask, pid_n, dgates_ptr, num_slots, PER_ROW: tl.constexpr):
    """Add this tile's share of dg = <u, h> to each row's slot (PER_ROW: into the F block's own row)."""
    if PER_ROW:
        tl.store(dgates_ptr + pid_n * num_slots + slots, tl.sum(u * h, axis=1), mask=row_mask)
    else:
        # Only the sum matters, read after the kernel: no ordering between programs is needed.
        tl.atomic_add(dgates_ptr + slots, tl.sum(u * h, axis=1), mask=row_mask, sem="relaxed")


@ROW_GEMM_TILES.autotune(key=["D", "F"], reset_to_zero=["dgates_ptr"])
@triton.jit(do_not_specialize=["row_bucket"])
def _down_scatter_bwd_kernel(
    dy_ptr, h_ptr, gates_ptr, slot_order_ptr, offsets_ptr, w2_ptr, dh_ptr, dgates_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we, row_bucket,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # BLOCK_N tiles F (the output dh), BLOCK_K tiles D (the reduction). PER_ROW: dgates is [F blocks, S].
    expert, rows, row_mask, pid_n, cols, slots, w_base = expert_tile(offsets_ptr, slot_order_ptr, num_experts,
                                                                     num_slots, F, stride_we, BLOCK_M, BLOCK_N,
                                                                     GROUP_M, P)
    out, out_mask = out_tile(rows, row_mask, cols, F)
    if expert >= num_experts:
        tl.store(dh_ptr + out, tl.zeros((BLOCK_M, BLOCK_N), dtype=dh_ptr.dtype.element_ty), mask=out_mask)
        return
    # u = dy[tokens] @ w2[e]ᵀ: [BLOCK_M rows, BLOCK_N of F], w2[e]ᵀ read straight from the [E, F, D] layout.
    u = rows_times_weight(dy_ptr, w2_ptr, w_base, slots // num_slots_per_token, row_mask, cols, D, F, True,
                          DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    h = tl.load(h_ptr + out, mask=out_mask, other=0.0).to(tl.float32)
    _gate_grad(u, h, slots, row_mask, pid_n, dgates_ptr, num_slots, PER_ROW)
    gate = tl.load(gates_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + out, (u * gate[:, None]).to(dh_ptr.dtype.element_ty), mask=out_mask)


@SWIGLU_BWD_TILES.autotune(key=["D", "F"], reset_to_zero=["dgates_ptr"])
@triton.jit(do_not_specialize=["row_bucket"])
def _down_swiglu_bwd_kernel(
    dy_ptr, a1_ptr, a3_ptr, gates_ptr, slot_order_ptr, offsets_ptr, w2_ptr, h_ptr, da1_ptr, da3_ptr, dgates_ptr,
    num_experts, num_slots, num_slots_per_token, D, F, stride_we, row_bucket,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # As _down_scatter_bwd_kernel, but h = silu(a1) * a3 is recomputed (and written, for dw2) and the
    # epilogue writes da1, da3 instead of dh. Idle rows are left unwritten: nothing reads them.
    expert, rows, row_mask, pid_n, cols, slots, w_base = expert_tile(offsets_ptr, slot_order_ptr, num_experts,
                                                                     num_slots, F, stride_we, BLOCK_M, BLOCK_N,
                                                                     GROUP_M, P)
    if expert >= num_experts:
        return
    u = rows_times_weight(dy_ptr, w2_ptr, w_base, slots // num_slots_per_token, row_mask, cols, D, F, True,
                          DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # Five [S, F] tiles share one int32 offset tile from the block's first row (BLOCK_M * F < 2^31): five
    # 64-bit pointer tiles live at once spill the registers.
    first = tl.min(rows, axis=0) * F
    out = tl.arange(0, BLOCK_M)[:, None] * F + cols[None, :]
    out_mask = row_mask[:, None] & (cols < F)[None, :]
    a1 = tl.load(a1_ptr + first + out, mask=out_mask, other=0.0).to(tl.float32)
    a3 = tl.load(a3_ptr + first + out, mask=out_mask, other=0.0).to(tl.float32)
    # h as the forward rounded it: y was computed from h in h's dtype.
    h = (a1 * tl.sigmoid(a1) * a3).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + first + out, h, mask=out_mask)
    _gate_grad(u, h.to(tl.float32), slots, row_mask, pid_n, dgates_ptr, num_slots, PER_ROW)
    gate = tl.load(gates_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    da1, da3 = swiglu_grads(u * gate[:, None], a1, a3)
    tl.store(da1_ptr + first + out, da1.to(da1_ptr.dtype.element_ty), mask=out_mask)
    tl.store(da3_ptr + first + out, da3.to(da3_ptr.dtype.element_ty), mask=out_mask)


def _check(h_SF: torch.Tensor, gates_TK: torch.Tensor, slot_order_S, offsets_E, w2_EFD: torch.Tensor) -> None:
    check_triton(h_SF, w2_EFD)
    check_sorted_rows(slot_order_S, offsets_E)
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
    tf32: bool = False,
) -> torch.Tensor:
    """Launch the forward. Returns y_TD in h's dtype; ``deterministic``: combined in slot order;
    ``tf32``: fp32 dots in TF32."""
    _check(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)
    h_SF, gates_S, w2_EFD = h_SF.contiguous(), gates_TK.reshape(-1).contiguous(), w2_EFD.contiguous()
    (num_tokens, top_k), (num_experts, width, dim) = gates_TK.shape, w2_EFD.shape
    # fp32 accumulator: atomic, by token; or deterministic, by sorted row (idle rows stay zero)
    y_out = torch.zeros(h_SF.shape[0] if deterministic else num_tokens, dim, dtype=torch.float32, device=h_SF.device)

    def grid(meta):
        return (row_blocks(h_SF.shape[0], num_experts, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]),)

    launch(
        _down_scatter_fwd_kernel, grid, h_SF, gates_S, slot_order_S, offsets_E, w2_EFD, y_out,
        num_experts, h_SF.shape[0], top_k, dim, width, w2_EFD.stride(0), row_bucket(h_SF.shape[0]),
        deterministic=deterministic, P=padded(num_experts), DOT_PRECISION=dot_precision(h_SF.dtype, tf32),
        PER_ROW=deterministic,
    )  # fmt: skip
    if deterministic:
        y_out = combine_rows(y_out, slot_order_S, num_tokens, top_k, deterministic=True)
    return y_out.to(h_SF.dtype)


def _down_bwd(dy_TD, h_SF, a1_SF, a3_SF, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic, tf32):
    """Both backward kernels: ``a1_SF is None``: h given, returns (dh, None, dgates, dw2); else h is
    recomputed from a1, a3 and the result is (da1, da3, dgates, dw2)."""
    swiglu = a1_SF is not None
    rows_SF = a1_SF if swiglu else h_SF
    _check(rows_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)
    dy_TD, w2_EFD = dy_TD.to(rows_SF.dtype).contiguous(), w2_EFD.contiguous()
    gates_S = gates_TK.reshape(-1).contiguous()
    num_slots, top_k, (num_experts, width, dim) = rows_SF.shape[0], gates_TK.shape[1], w2_EFD.shape
    kernel = _down_swiglu_bwd_kernel if swiglu else _down_scatter_bwd_kernel
    precision = dot_precision(rows_SF.dtype, tf32)
    # fp32 accumulator: atomic over F blocks; or deterministic, one row per F block of the pinned config
    num_partials = 1
    if deterministic:
        num_partials = triton.cdiv(width, pinned_config(kernel, {"DOT_PRECISION": precision}).kwargs["BLOCK_N"])
    dgates_PS = torch.zeros(num_partials, gates_S.numel(), dtype=torch.float32, device=rows_SF.device)
    if swiglu:
        a1_SF, a3_SF = a1_SF.contiguous(), a3_SF.contiguous()
        h_SF, g1_SF, g3_SF = (torch.empty_like(a1_SF) for _ in range(3))
        tensors = (dy_TD, a1_SF, a3_SF, gates_S, slot_order_S, offsets_E, w2_EFD, h_SF, g1_SF, g3_SF, dgates_PS)
    else:
        h_SF, g3_SF = h_SF.contiguous(), None
        g1_SF = torch.empty_like(h_SF)
        tensors = (dy_TD, h_SF, gates_S, slot_order_S, offsets_E, w2_EFD, g1_SF, dgates_PS)

    def grid(meta):
        return (row_blocks(num_slots, num_experts, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    launch(
        kernel, grid, *tensors, num_experts, num_slots, top_k, dim, width, w2_EFD.stride(0), row_bucket(num_slots),
        deterministic=deterministic, P=padded(num_experts), DOT_PRECISION=precision, PER_ROW=deterministic,
    )  # fmt: skip
    dw2_EFD = grouped_wgrad(
        h_SF, dy_TD, slot_order_S, offsets_E, top_k, a_gather=False, b_gather=True, scale_S=gates_S.float(),
        deterministic=deterministic, tf32=tf32,
    )
    return g1_SF, g3_SF, dgates_PS.sum(0).to(gates_TK.dtype).view(gates_TK.shape), dw2_EFD


def down_scatter_bwd(
    dy_TD: torch.Tensor,
    h_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
    deterministic: bool = False,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dh_SF, dgates_TK (gates' dtype), dw2_EFD; ``deterministic``: no atomics."""
    dh_SF, _, dgates_TK, dw2_EFD = _down_bwd(
        dy_TD, h_SF, None, None, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic, tf32
    )
    return dh_SF, dgates_TK, dw2_EFD


def down_swiglu_bwd(
    dy_TD: torch.Tensor,
    a1_SF: torch.Tensor,
    a3_SF: torch.Tensor,
    gates_TK: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    w2_EFD: torch.Tensor,
    deterministic: bool = False,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``down_scatter(silu(a1) * a3, ...)`` through the SwiGLU, in one pass.

    Args:
        dy_TD: [T, D]; a1_SF, a3_SF: [S, F] the saved pre-activations (idle rows are never read);
        gates_TK, slot_order_S, offsets_E, w2_EFD: as ``down_scatter``.

    Returns:
        da1_SF, da3_SF (a1's dtype; idle rows unwritten), dgates_TK (gates' dtype), dw2_EFD.
    """
    if a3_SF.shape != a1_SF.shape or a3_SF.dtype != a1_SF.dtype:
        raise ValueError(f"a1 {tuple(a1_SF.shape)} {a1_SF.dtype} and a3 {tuple(a3_SF.shape)} {a3_SF.dtype} differ")
    return _down_bwd(dy_TD, None, a1_SF, a3_SF, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic, tf32)


_down_scatter_op = torch.library.custom_op("pure_reasoner::triton_down_scatter", down_scatter_fwd, mutates_args=())


@_down_scatter_op.register_fake
def _(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic=False, tf32=False):
    return h_SF.new_empty(gates_TK.shape[0], w2_EFD.shape[2])


_down_scatter_bwd_op = torch.library.custom_op("pure_reasoner::triton_down_scatter_bwd", down_scatter_bwd,
                                               mutates_args=())


@_down_scatter_bwd_op.register_fake
def _(dy_TD, h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic=False, tf32=False):
    # new_empty, not empty_like: the real op returns contiguous tensors whatever the inputs' strides.
    return h_SF.new_empty(h_SF.shape), gates_TK.new_empty(gates_TK.shape), w2_EFD.new_empty(w2_EFD.shape)


def _setup_context(ctx, inputs, output):
    *tensors, ctx.deterministic, ctx.tf32 = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy_TD):
    dh_SF, dgates_TK, dw2_EFD = _down_scatter_bwd_op(dy_TD, *ctx.saved_tensors, ctx.deterministic, ctx.tf32)
    return dh_SF, dgates_TK, None, None, dw2_EFD, None, None


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
        h_SF: [S, F] expert activations in sorted-row order (``kernels.expert_mlp.triton_up.gather_swiglu``).
        gates_TK: [T, K] gate weights (read only on routed slots).
        slot_order_S: [S] int64; offsets_E: [E] int32 end offsets (``kernels.routing_metadata``).
        w2_EFD: [E, F, D] down projections.

    Returns:
        y_TD: [T, D] in h's dtype; zero for tokens that consulted nothing.
    """
    return _down_scatter_op(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD)

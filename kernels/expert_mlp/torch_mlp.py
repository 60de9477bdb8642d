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

What the backward keeps: the pre-activations a1, a3 of the first ``max_rows`` sorted rows only (compact:
of the R routed rows). A static bound derived from the target consult rate (``moe.experts``) makes the
saved bytes follow the routing without reading R. Rows past the bound, when a batch routes more, are
computed in the forward by the same grouped GEMMs over offsets shifted by the bound (no work for the
experts with no such rows) and recomputed in the backward, as activation checkpointing does: exact, never
dropped, only slower. The combine back to tokens is ``kernels.expert_mlp.combine.combine_rows``.

Fused gate/up (``w13_ED2F``, gate then up along the last dim; transformers' ``gate_up_proj`` is stored so): the
two up-projections are one GEMM of width 2F (forward), one weight gradient and one input gradient of inner size 2F
(backward): 6 grouped GEMMs per forward + backward instead of 9; the pre-activations are kept as one [H, 2F] tensor
(``a3_HF`` then [H, 0]) and the gradient goes to ``w13_ED2F`` in its own layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pure_reasoner.kernels import engines, onednn_gemm, small_gemm
from pure_reasoner.kernels.expert_mlp.combine import combine_rows
from pure_reasoner.kernels.routing.metadata import expert_row_ranges, routing_metadata

_GROUPED_MM_ALIGN_BYTES = 16  # grouped_mm rejects row strides that are not a multiple of 16 bytes
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(dtype: torch.dtype, *dims: int) -> bool:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return dtype in _GROUPED_MM_DTYPES and all((n * itemsize) % _GROUPED_MM_ALIGN_BYTES == 0 for n in dims)


def _engine(shape_class: str, x: torch.Tensor, in_dim: int, out_dim: int) -> tuple[str, str]:
    """The engine for these grouped GEMMs and, for ``small``, the one its experts with many rows go to (the
    ``grouped_large`` pick): this machine's picks (``kernels.engines``) for CPU fp32 GEMMs with weights big enough to
    repay oneDNN's per-shape kernel compile, else ``grouped_mm``."""
    if engines.cpu_fp32(x) and in_dim * out_dim >= onednn_gemm.MIN_GROUPED_WEIGHT:
        choice = engines.current()
        return getattr(choice, shape_class), choice.grouped_large
    return "grouped_mm", "mkl"


def _mm_onednn_into(a_MI: torch.Tensor, b_IO: torch.Tensor, out_MO: torch.Tensor) -> None:
    out_MO.copy_(onednn_gemm.matmul(a_MI, b_IO))  # the op has no out= form


def large_matmul(engine: str) -> small_gemm.MatmulInto:
    """One expert's matmul written into a given output, on the named engine, ``mkl`` (``torch.mm(out=)``: no copy)
    or ``onednn`` (what ``small`` hands its experts with many rows to)."""
    return _mm_onednn_into if engine == "onednn" else small_gemm.mm_into


def grouped_matmul_with(engine: str, x_RI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor,
                        large: str = "mkl") -> torch.Tensor:
    """``grouped_matmul`` on the named engine: ``onednn``, ``grouped_mm`` (where its stride rule and dtype
    allow), ``small`` (``kernels.small_gemm``; experts with many rows on the engine ``large``) or ``mkl`` (a
    ``torch.mm`` per expert, reading the offsets on the host)."""
    if engine == "small":
        return small_gemm.grouped_matmul(x_RI, w_EIO, offsets_E, large=large_matmul(large))
    if engine == "onednn":
        return onednn_gemm.grouped_matmul(x_RI, w_EIO, offsets_E)
    if engine == "grouped_mm" and _grouped_mm_ok(x_RI.dtype, *x_RI.shape[1:], *w_EIO.shape[1:]):
        return F.grouped_mm(x_RI, w_EIO, offs=offsets_E)
    out_RO = x_RI.new_zeros(x_RI.shape[0], w_EIO.shape[2])
    for e, start, end in expert_row_ranges(offsets_E):
        torch.mm(x_RI[start:end], w_EIO[e], out=out_RO[start:end])
    return out_RO


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
    engine, large = _engine("grouped", x_RI, w_EIO.shape[1], w_EIO.shape[2])
    return grouped_matmul_with(engine, x_RI, w_EIO, offsets_E, large)


def grouped_matmul_wgrad_with(engine: str, a_RI: torch.Tensor, b_RO: torch.Tensor, offsets_E: torch.Tensor,
                              large: str = "mkl") -> torch.Tensor:
    """``grouped_matmul_wgrad`` on the named engine (see ``grouped_matmul_with``)."""
    if engine == "small":
        return small_gemm.grouped_matmul_wgrad(a_RI, b_RO, offsets_E, large=large_matmul(large))
    if engine == "onednn":
        return onednn_gemm.grouped_matmul_wgrad(a_RI, b_RO, offsets_E)
    if engine == "grouped_mm" and _grouped_mm_ok(a_RI.dtype, *a_RI.shape[1:], *b_RO.shape[1:]):
        return F.grouped_mm(a_RI.t(), b_RO, offs=offsets_E)
    out_EIO = a_RI.new_zeros(offsets_E.numel(), a_RI.shape[1], b_RO.shape[1])
    for e, start, end in expert_row_ranges(offsets_E):
        torch.mm(a_RI[start:end].t(), b_RO[start:end], out=out_EIO[e])
    return out_EIO


def grouped_matmul_wgrad(a_RI: torch.Tensor, b_RO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per expert, the sum over its rows of ``a[r]ᵀ b[r]``: [E, I, O], zero for experts with no rows."""
    engine, large = _engine("grouped_wgrad", a_RI, a_RI.shape[1], b_RO.shape[1])
    return grouped_matmul_wgrad_with(engine, a_RI, b_RO, offsets_E, large)


def _transposed(w_EIO: torch.Tensor) -> bool:
    """Whether ``w`` is laid out as a transposed view: unit stride along I, not along O."""
    return w_EIO.stride(1) == 1 and w_EIO.stride(2) != 1


def wgrad_like(w_EIO: torch.Tensor, a_RI: torch.Tensor, b_RO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``grouped_matmul_wgrad(a, b)``, [E, I, O], in ``w``'s layout: for a transposed view of an [E, O, I] tensor
    (a transformers experts module's ``down_proj`` or gate/up halves) the product is computed as [E, O, I] and
    returned transposed, so autograd hands the stored tensor a contiguous gradient instead of copying one."""
    if _transposed(w_EIO):
        return grouped_matmul_wgrad(b_RO, a_RI, offsets_E).transpose(1, 2)
    return grouped_matmul_wgrad(a_RI, b_RO, offsets_E)


def _empty_wgrad_like(w_EIO: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped and laid out as ``wgrad_like`` returns for ``w`` (for the fake kernel)."""
    num_experts, rows, cols = w_EIO.shape
    if _transposed(w_EIO):
        return w_EIO.new_empty(num_experts, cols, rows).transpose(1, 2)
    return w_EIO.new_empty(num_experts, rows, cols)


def _valid_rows(num_rows: int, offsets_E: torch.Tensor) -> torch.Tensor:
    """[R, 1] bool: sorted row r is routed (masked mode), computed on the device."""
    return (torch.arange(num_rows, device=offsets_E.device) < offsets_E[-1]).unsqueeze(1)


def segment_offsets(offsets_E: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[E] int32 end offsets of the sorted rows ``[start, stop)``, counted from ``start``: each expert's
    share of that window (zero for the experts with no rows in it). On the device; no host read."""
    return (offsets_E.clamp(start, stop) - start).to(torch.int32)


def _preactivations(
    x_TD: torch.Tensor,
    slot_R: torch.Tensor,
    offsets_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    top_k: int,
    masked: bool,
    w13_ED2F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-activations of the rows ``slot_R`` (offsets relative to its first row) as they are kept: (a1_RF,
    a3_RF), or with ``w13_ED2F`` (a13_R2F, an [R, 0] tensor); masked: unrouted rows zero."""
    x_RD = x_TD.index_select(0, slot_R // top_k)
    if w13_ED2F is not None:
        pair = grouped_matmul(x_RD, w13_ED2F, offsets_E), x_RD.new_empty(x_RD.shape[0], 0)
    else:
        pair = grouped_matmul(x_RD, w1_EDF, offsets_E), grouped_matmul(x_RD, w3_EDF, offsets_E)
    if masked:
        valid_R1 = _valid_rows(slot_R.numel(), offsets_E)
        pair = tuple(torch.where(valid_R1, a, 0.0) for a in pair)
    return pair


def _gate_up(a1_HF: torch.Tensor, a3_HF: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a1, a3) [R, F] from the kept pre-activations: views of the fused [R, 2F] tensor when ``a3_HF`` is empty."""
    if a3_HF.shape[1] == 0 and width > 0:
        return a1_HF[:, :width], a1_HF[:, width:]
    return a1_HF, a3_HF


def _rows_forward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, slot_R, offsets_E, masked, w13_ED2F=None):
    """(y_RD gate-weighted outputs, and the kept pre-activations, see ``_preactivations``) of the rows ``slot_R``
    (offsets relative to its first row)."""
    a1_RF, a3_RF = _preactivations(x_TD, slot_R, offsets_E, w1_EDF, w3_EDF, gates_TK.shape[1], masked, w13_ED2F)
    gate_RF, up_RF = _gate_up(a1_RF, a3_RF, w1_EDF.shape[2])
    y_RD = grouped_matmul(F.silu(gate_RF).mul_(up_RF), w2_EFD, offsets_E)
    y_RD.mul_(gates_TK.reshape(-1).index_select(0, slot_R).to(y_RD.dtype).unsqueeze(1))  # fresh: in place
    if masked:
        y_RD = torch.where(_valid_rows(slot_R.numel(), offsets_E), y_RD, 0.0)
    return y_RD, a1_RF, a3_RF


def mlp_forward(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    compact: bool,
    max_rows: int,
    deterministic: bool,
    w13_ED2F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_TD and what the backward needs: (y_TD, a1_HF, a3_HF, slot_R, offsets_E).

    R = routed rows (compact) or S (masked); H = R (compact) or min(max_rows, S) (masked): the rows whose
    pre-activations are kept (rows past the routed count zero). Rows [H, R) are not kept. With ``w13_ED2F``
    (the fused gate/up weights; w1_EDF and w3_EDF then give shapes only) a1_HF is [H, 2F] and a3_HF [H, 0].
    """
    meta = routing_metadata(expert_ids_TK, w1_EDF.shape[0])
    masked = not compact
    num_rows = meta.slot_order_S.numel() if masked else int(meta.num_routed)
    num_kept = min(max_rows, num_rows) if masked else num_rows
    slot_R = meta.slot_order_S[:num_rows]
    y_HD, a1_HF, a3_HF = _rows_forward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, slot_R[:num_kept],
                                       segment_offsets(meta.offsets_E, 0, num_kept), masked, w13_ED2F)
    y_RD = y_HD
    if num_kept < num_rows:  # shapes only: the rows past the bound, not kept (recomputed in the backward)
        tail_E = segment_offsets(meta.offsets_E, num_kept, num_rows)
        y_VD, _, _ = _rows_forward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, slot_R[num_kept:], tail_E, masked,
                                   w13_ED2F)
        y_RD = torch.cat([y_HD, y_VD])
    y_TD = combine_rows(y_RD, slot_R, *expert_ids_TK.shape, deterministic)
    return y_TD, a1_HF, a3_HF, slot_R, meta.offsets_E


def mlp_backward(
    dy_TD: torch.Tensor,
    x_TD: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    a1_HF: torch.Tensor,
    a3_HF: torch.Tensor,
    slot_R: torch.Tensor,
    offsets_E: torch.Tensor,
    compact: bool,
    deterministic: bool,
    w13_ED2F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx_TD, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD, dw13_ED2F) from ``mlp_forward``'s saved tensors.
    Without ``w13_ED2F`` dw13_ED2F is an empty [0] tensor; with it dw1_EDF and dw3_EDF are."""
    # The contiguity seam: ``y.sum().backward()`` sends an expanded (stride-0) dy, which grouped_mm's
    # CPU kernels reject ("Invalid strides/sizes").
    dy_TD = dy_TD.contiguous()
    top_k = gates_TK.shape[1]
    a1_RF, a3_RF = a1_HF, a3_HF
    num_kept, num_rows = a1_HF.shape[0], slot_R.numel()
    if num_kept < num_rows:  # recompute the rows the forward did not keep (none routed: no GEMM work)
        tail_E = segment_offsets(offsets_E, num_kept, num_rows)
        a1_VF, a3_VF = _preactivations(x_TD, slot_R[num_kept:], tail_E, w1_EDF, w3_EDF, top_k, not compact,
                                       w13_ED2F)
        a1_RF, a3_RF = torch.cat([a1_HF, a1_VF]), torch.cat([a3_HF, a3_VF])
    a1_RF, a3_RF = _gate_up(a1_RF, a3_RF, w1_EDF.shape[2])
    token_R = slot_R // top_k
    valid_R1 = None if compact else _valid_rows(num_rows, offsets_E)
    gate_R1 = gates_TK.reshape(-1).index_select(0, slot_R).to(dy_TD.dtype).unsqueeze(1)
    dy_RD = dy_TD.index_select(0, token_R)
    silu_RF = F.silu(a1_RF)
    h_RF = silu_RF * a3_RF
    u_RF = grouped_matmul(dy_RD, w2_EFD.transpose(1, 2), offsets_E)
    if valid_R1 is not None:
        u_RF = torch.where(valid_R1, u_RF, 0.0)
    dgate_R = (u_RF * h_RF).sum(1)
    dw2_EFD = wgrad_like(w2_EFD, h_RF, dy_RD * gate_R1, offsets_E)
    del h_RF
    # Fewer passes and fresh buffers over [R, F]: u is not needed past dgate, so dh is u scaled in place, and
    # da1 | da3 are written straight into the [R, 2F] input of the fused GEMMs (no concatenation).
    dh_RF = u_RF.mul_(gate_R1)
    width = silu_RF.shape[1]
    if w13_ED2F is not None:
        da13_R2F = silu_RF.new_empty(num_rows, 2 * width)
        da1_RF, da3_RF = da13_R2F[:, :width], da13_R2F[:, width:]
    else:
        da1_RF, da3_RF = torch.empty_like(silu_RF), torch.empty_like(silu_RF)
    torch.mul(dh_RF, silu_RF, out=da3_RF)
    torch.ops.aten.silu_backward.grad_input(dh_RF.mul_(a3_RF), a1_RF, grad_input=da1_RF)
    x_RD = x_TD.index_select(0, token_R)
    if w13_ED2F is not None:
        dw13_ED2F = wgrad_like(w13_ED2F, x_RD, da13_R2F, offsets_E)
        dw1_EDF, dw3_EDF = w1_EDF.new_empty(0), w1_EDF.new_empty(0)  # distinct: op outputs may not alias
        dx_RD = grouped_matmul(da13_R2F, w13_ED2F.transpose(1, 2), offsets_E)
    else:
        dw1_EDF = wgrad_like(w1_EDF, x_RD, da1_RF, offsets_E)
        dw3_EDF = wgrad_like(w3_EDF, x_RD, da3_RF, offsets_E)
        dw13_ED2F = w1_EDF.new_empty(0)
        dx_RD = grouped_matmul(da1_RF, w1_EDF.transpose(1, 2), offsets_E)
        dx_RD += grouped_matmul(da3_RF, w3_EDF.transpose(1, 2), offsets_E)
    if valid_R1 is not None:
        dx_RD = torch.where(valid_R1, dx_RD, 0.0)
    dx_TD = combine_rows(dx_RD, slot_R, x_TD.shape[0], top_k, deterministic)
    dgates_S = torch.zeros(gates_TK.numel(), dtype=gates_TK.dtype, device=gates_TK.device)
    dgates_S.index_copy_(0, slot_R, dgate_R.to(gates_TK.dtype))
    return dx_TD, dgates_S.view(gates_TK.shape), dw1_EDF, dw3_EDF, dw2_EFD, dw13_ED2F


_mlp_op = torch.library.custom_op("pure_reasoner::torch_knowledge_mlp", mlp_forward, mutates_args=())


@_mlp_op.register_fake
def _(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact, max_rows, deterministic, w13_ED2F=None):
    # Compact mode processes as many rows as were routed: a size known only from the data.
    num_slots = expert_ids_TK.numel()
    num_rows = torch.library.get_ctx().new_dynamic_size() if compact else num_slots
    num_kept = num_rows if compact else min(max_rows, num_slots)
    width = w1_EDF.shape[2]
    fused = w13_ED2F is not None
    return (
        torch.empty_like(x_TD),
        x_TD.new_empty(num_kept, 2 * width if fused else width),
        x_TD.new_empty(num_kept, 0 if fused else width),
        expert_ids_TK.new_empty(num_rows, dtype=torch.int64),
        expert_ids_TK.new_empty(w1_EDF.shape[0], dtype=torch.int32),
    )


_mlp_bwd_op = torch.library.custom_op("pure_reasoner::torch_knowledge_mlp_bwd", mlp_backward, mutates_args=())


@_mlp_bwd_op.register_fake
def _(dy_TD, x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_HF, a3_HF, slot_R, offsets_E, compact, deterministic,
      w13_ED2F=None):
    if w13_ED2F is None:
        up = (_empty_wgrad_like(w1_EDF), _empty_wgrad_like(w3_EDF), _empty_wgrad_like(w2_EFD), w1_EDF.new_empty(0))
    else:
        up = (w1_EDF.new_empty(0), w1_EDF.new_empty(0), _empty_wgrad_like(w2_EFD), _empty_wgrad_like(w13_ED2F))
    return torch.empty_like(x_TD), torch.empty_like(gates_TK), *up


def _setup_context(ctx, inputs, output):
    x_TD, _, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact, _, deterministic, *fused = inputs
    _, a1_HF, a3_HF, slot_R, offsets_E = output
    ctx.mark_non_differentiable(a1_HF, a3_HF, slot_R, offsets_E)  # saved for backward, not results
    ctx.save_for_backward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_HF, a3_HF, slot_R, offsets_E, *fused)
    ctx.compact, ctx.deterministic, ctx.fused = compact, deterministic, bool(fused) and fused[0] is not None
    # Compact mode with nothing routed (a row count known on the host; symbolic under torch.compile, where
    # this shortcut is skipped): every gradient is zero, so return none at all. Autograd then leaves the
    # experts' .grad untouched instead of writing 3 x [E, D, F] zeros. Not in a group of several ranks: there
    # every rank must produce the same set of gradients (ZeRO reduces the gradients that exist, bucket by
    # bucket), so a rank that routed nothing while another routed rows returns zeros.
    ctx.nothing_routed = (compact and isinstance(a1_HF.shape[0], int) and a1_HF.shape[0] == 0
                          and not _several_ranks())


def _several_ranks() -> bool:
    """Whether this process is one of several ranks of an initialised process group (data or expert parallel)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _backward(ctx, dy_TD, *_saved_grads):
    if ctx.nothing_routed:
        return (None,) * 10
    saved = ctx.saved_tensors
    w13 = saved[9] if ctx.fused else None
    grads = _mlp_bwd_op(dy_TD, *saved[:9], ctx.compact, ctx.deterministic, w13)
    dx_TD, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD, dw13_ED2F = grads
    if ctx.fused:
        return dx_TD, None, dgates_TK, None, None, dw2_EFD, None, None, None, dw13_ED2F
    return dx_TD, None, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD, None, None, None, None


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def knowledge_mlp_torch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    compact: bool | None = None,
    max_rows: int | None = None,
    deterministic: bool = False,
    w13_ED2F: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of the consulted experts' SwiGLU outputs per token (see module docstring).

    Args:
        x_TD: [T, D] tokens.
        expert_ids_TK: [T, K] int expert ids, ``NOT_CONSULTED`` (-1) for idle slots.
        gates_TK: [T, K] gate weights (ignored on idle slots).
        w1_EDF, w3_EDF: [E, D, F] gate and up projections.
        w2_EFD: [E, F, D] down projection.
        compact: process exactly the routed rows (host read of their count); default: on CPU.
        max_rows: masked mode: keep the pre-activations of this many sorted rows for the backward and
            recompute the rest there; None keeps all T*K. Compact mode keeps exactly the routed rows.
        deterministic: combine each token's slots in slot order (``kernels.expert_mlp.combine``).
        w13_ED2F: [E, D, 2F], gate then up along the last dim: the up-projections as one fused weight (w1_EDF and
            w3_EDF must be its two halves; they then give shapes only, and the gradient goes to w13_ED2F).

    Returns:
        y_TD: [T, D], zero for tokens that consulted nothing. Differentiable in x, gates and weights.
    """
    if compact is None:
        compact = x_TD.device.type == "cpu"
    num_slots = expert_ids_TK.numel()
    max_rows = num_slots if max_rows is None else max_rows
    if w13_ED2F is not None and tuple(w13_ED2F.shape) != (*w1_EDF.shape[:2], 2 * w1_EDF.shape[2]):
        raise ValueError(f"w13_ED2F must have shape {(*w1_EDF.shape[:2], 2 * w1_EDF.shape[2])} (w1_EDF's with 2F), "
                         f"got {tuple(w13_ED2F.shape)}")
    y_TD, *_ = _mlp_op(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, compact, max_rows, deterministic,
                       w13_ED2F)
    return y_TD

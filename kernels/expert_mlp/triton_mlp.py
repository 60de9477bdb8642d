"""The knowledge-expert MLP in Triton: routing metadata -> gather + SwiGLU -> down + scatter-add.

Shapes: T tokens, K slots per token, S = T*K slots, H <= S rows kept for the backward, D model dim,
F expert width, E experts.

The forward and the backward are one ``torch.library`` custom op each (with fake, shape-only
implementations), built from the launchers of ``kernels.expert_mlp.triton_up`` and ``kernels.expert_mlp.triton_down``,
so ``torch.compile`` sees opaque nodes and nothing reads a routed count back to the host. What the backward
keeps is the pre-activations a1, a3 of the first H = ``max_rows`` sorted rows, a static bound: the saved
bytes follow the routing, not T*K. Rows [H, S) (routed ones only when a batch exceeds the bound) run in
the forward without keeping anything and are recomputed in the backward, exactly (the grouped kernels do
no work for an expert with no rows in a window). The backward of the down projection recomputes
h = silu(a1) * a3 from them and hands the up projection's backward da1, da3, the SwiGLU's backward
taken once in its epilogue (``kernels.expert_mlp.triton_down.down_swiglu_bwd``). ``tf32``: fp32 dots on tensor
cores in TF32. Importing this module imports triton.
"""

from __future__ import annotations

import torch

from pure_reasoner.kernels.expert_mlp.torch_mlp import segment_offsets
from pure_reasoner.kernels.expert_mlp.triton_down import down_scatter_fwd, down_swiglu_bwd
from pure_reasoner.kernels.expert_mlp.triton_up import gather_swiglu_bwd, gather_swiglu_fwd
from pure_reasoner.kernels.routing.triton_routing import routing_metadata_triton


def _swiglu_window(x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, top_k, start, stop, save, deterministic, tf32):
    """(h, a1, a3) of the sorted rows [start, stop); a1, a3 are [0, F] unless ``save``."""
    window_E = segment_offsets(offsets_E, start, stop)
    return gather_swiglu_fwd(x_TD, slot_order_S[start:stop], window_E, w1_EDF, w3_EDF, top_k, save, deterministic,
                             tf32)


def knowledge_mlp_fwd(
    x_TD: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    max_rows: int,
    save: bool,
    deterministic: bool,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's launches (the body of the custom op ``_mlp_op``). Returns y_TD and, if ``save``,
    a1_HF, a3_HF of the first H = min(max_rows, S) sorted rows (else [0, F] each)."""
    top_k, num_slots = gates_TK.shape[1], slot_order_S.numel()
    num_kept = min(max_rows, num_slots)
    window = (x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, top_k)
    h_HF, a1_HF, a3_HF = _swiglu_window(*window, 0, num_kept, save, deterministic, tf32)
    h_SF = h_HF
    if num_kept < num_slots:  # shapes only: the rows past the bound, kept by no one
        h_VF, _, _ = _swiglu_window(*window, num_kept, num_slots, False, deterministic, tf32)
        h_SF = torch.cat([h_HF, h_VF])
    y_TD = down_scatter_fwd(h_SF, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic, tf32)
    return y_TD, a1_HF, a3_HF


_mlp_op = torch.library.custom_op("pure_reasoner::triton_knowledge_mlp", knowledge_mlp_fwd, mutates_args=())


@_mlp_op.register_fake
def _(x_TD, slot_order_S, offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, max_rows, save, deterministic, tf32):
    kept = min(max_rows, slot_order_S.shape[0]) if save else 0
    width = w1_EDF.shape[2]
    # new_empty, not empty_like: the real op returns contiguous tensors whatever the inputs' strides.
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(kept, width), x_TD.new_empty(kept, width)


def knowledge_mlp_bwd(
    dy_TD: torch.Tensor,
    x_TD: torch.Tensor,
    slot_order_S: torch.Tensor,
    offsets_E: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    a1_HF: torch.Tensor,
    a3_HF: torch.Tensor,
    deterministic: bool,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's launches (the body of the custom op ``_mlp_bwd_op``). Returns dx_TD, dgates_TK,
    dw1_EDF, dw3_EDF, dw2_EFD; rows past the H saved ones are recomputed first."""
    top_k, num_slots, num_kept = gates_TK.shape[1], slot_order_S.numel(), a1_HF.shape[0]
    a1_SF, a3_SF = a1_HF, a3_HF
    if num_kept < num_slots:
        window = (x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, top_k)
        _, a1_VF, a3_VF = _swiglu_window(*window, num_kept, num_slots, True, deterministic, tf32)
        a1_SF, a3_SF = torch.cat([a1_HF, a1_VF]), torch.cat([a3_HF, a3_VF])
    da1_SF, da3_SF, dgates_TK, dw2_EFD = down_swiglu_bwd(
        dy_TD, a1_SF, a3_SF, gates_TK, slot_order_S, offsets_E, w2_EFD, deterministic, tf32
    )
    dx_TD, dw1_EDF, dw3_EDF = gather_swiglu_bwd(
        da1_SF, da3_SF, x_TD, slot_order_S, offsets_E, w1_EDF, w3_EDF, top_k, deterministic, tf32
    )
    return dx_TD, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD


_mlp_bwd_op = torch.library.custom_op("pure_reasoner::triton_knowledge_mlp_bwd", knowledge_mlp_bwd, mutates_args=())


@_mlp_bwd_op.register_fake
def _(dy_TD, x_TD, slot_order_S, offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_HF, a3_HF, deterministic, tf32):
    # new_empty, not empty_like: the real op returns contiguous tensors whatever the inputs' strides.
    return tuple(t.new_empty(t.shape) for t in (x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD))


def _setup_context(ctx, inputs, output):
    x_TD, slot_order_S, offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, _, _, deterministic, tf32 = inputs
    _, a1_HF, a3_HF = output
    ctx.mark_non_differentiable(a1_HF, a3_HF)  # saved pre-activations, not results
    ctx.save_for_backward(x_TD, slot_order_S, offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_HF, a3_HF)
    ctx.deterministic, ctx.tf32 = deterministic, tf32


def _backward(ctx, dy_TD, _da1, _da3):
    x_TD, slot_order_S, offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_HF, a3_HF = ctx.saved_tensors
    dx_TD, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD = _mlp_bwd_op(
        dy_TD, x_TD, slot_order_S, offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, a1_HF, a3_HF, ctx.deterministic,
        ctx.tf32,
    )
    return dx_TD, None, None, dgates_TK, dw1_EDF, dw3_EDF, dw2_EFD, None, None, None, None


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def knowledge_mlp_triton(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    max_rows: int | None = None,
    deterministic: bool = False,
    tf32: bool = False,
    debug: bool = False,
) -> torch.Tensor:
    """Same contract as ``kernels.knowledge_mlp``; differentiable in x, gates and every weight.

    Args:
        x_TD: [T, D]; expert_ids_TK: [T, K] (``NOT_CONSULTED`` = idle); gates_TK: [T, K];
        w1_EDF, w3_EDF: [E, D, F]; w2_EFD: [E, F, D]. CUDA, or CPU under ``TRITON_INTERPRET=1``.
        max_rows: sorted rows whose pre-activations the backward keeps (None: all T*K); the rest it
            recomputes.
        deterministic: no atomics; a token's slots summed in slot order, launch configs pinned.
        tf32: fp32 dots on tensor cores in TF32 (training speed); off, fp32 is exact IEEE.
        debug: device-side check of the expert ids (``kernels.routing.triton_routing``).

    Returns:
        y_TD: [T, D].
    """
    meta = routing_metadata_triton(expert_ids_TK, w1_EDF.shape[0], debug)
    max_rows = expert_ids_TK.numel() if max_rows is None else max_rows
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD))
    y_TD, _, _ = _mlp_op(
        x_TD, meta.slot_order_S, meta.offsets_E, gates_TK, w1_EDF, w3_EDF, w2_EFD, max_rows, save, deterministic,
        tf32,
    )
    return y_TD

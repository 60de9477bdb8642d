"""The knowledge-expert MLP in Triton: routing metadata -> gather + SwiGLU -> down + scatter-add.

Shapes: T tokens, K slots per token, S = T*K slots, D model dim, F expert width, E experts.

Every step is a ``torch.library`` custom op with a fake (shape-only) implementation and, where
differentiable, a registered backward, so ``torch.compile`` treats each as one opaque node and
nothing reads a routed count back to the host. Importing this module imports triton.
"""

from __future__ import annotations

import torch

from kernels.triton_down import down_scatter
from kernels.triton_routing import routing_metadata_triton
from kernels.triton_up import gather_swiglu


def knowledge_mlp_triton(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``kernels.knowledge_mlp``; differentiable in x, gates and every weight.

    Args:
        x_TD: [T, D]; expert_ids_TK: [T, K] (``NOT_CONSULTED`` = idle); gates_TK: [T, K];
        w1_EDF, w3_EDF: [E, D, F]; w2_EFD: [E, F, D]. CUDA, or CPU under ``TRITON_INTERPRET=1``.

    Returns:
        y_TD: [T, D].
    """
    meta = routing_metadata_triton(expert_ids_TK, w1_EDF.shape[0])
    top_k = expert_ids_TK.shape[1]
    h_SF = gather_swiglu(x_TD, meta.slot_order_S, meta.offsets_E, w1_EDF, w3_EDF, top_k)
    return down_scatter(h_SF, gates_TK, meta.slot_order_S, meta.offsets_E, w2_EFD)

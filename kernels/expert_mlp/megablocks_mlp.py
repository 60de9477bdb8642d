"""The knowledge-expert MLP on megablocks' grouped GEMM (optional; CUDA only; ``pip install -e .[gpu]``).

Shapes: T tokens, K slots per token, R routed rows, D model dim, F expert width, E experts.

megablocks' gather/scatter kernels assume every slot goes to a real expert, so idle slots would break
them; the routing, gather and scatter-add here are ours and only the three grouped GEMMs (megablocks'
``grouped_gemm_util.ops.gmm``, autograd included) are megablocks'. Its grouped GEMM takes the
per-expert row counts on the host: one device->host copy per call, which the Triton path avoids.
A peer for the GPU benchmarks; tested against the oracle where CUDA and megablocks are present
(``tests/kernels/test_dispatch.py``, skipped elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pure_reasoner.kernels.expert_mlp.combine import combine_rows
from pure_reasoner.kernels.routing.metadata import routing_metadata


def knowledge_mlp_megablocks(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    deterministic: bool = False,
) -> torch.Tensor:
    """Same contract as ``kernels.knowledge_mlp``; call through it (it checks CUDA and the install)."""
    from megablocks import grouped_gemm_util as gg

    meta = routing_metadata(expert_ids_TK, w1_EDF.shape[0])
    counts_E = meta.counts_E.cpu()  # the host sync megablocks' grouped GEMM needs
    num_rows = int(counts_E.sum())
    token_R, slot_R = meta.token_order_S[:num_rows], meta.slot_order_S[:num_rows]
    x_RD = x_TD.index_select(0, token_R)
    h_RF = F.silu(gg.ops.gmm(x_RD, w1_EDF, counts_E)) * gg.ops.gmm(x_RD, w3_EDF, counts_E)
    y_RD = gg.ops.gmm(h_RF, w2_EFD, counts_E) * gates_TK.reshape(-1)[slot_R].to(x_TD.dtype).unsqueeze(1)
    return combine_rows(y_RD, slot_R, *expert_ids_TK.shape, deterministic)

"""Pure ops for the knowledge path: routing metadata, grouped expert MLPs, their oracles; and the dense
linear the rest of the model uses (oneDNN GEMMs on CPU fp32).

Importing this package never imports triton; the Triton implementations load on first use.
"""

from pure_reasoner.kernels.expert_mlp.dispatch import IMPLS, knowledge_mlp
from pure_reasoner.kernels.onednn_gemm import dense_matmul_engines
from pure_reasoner.kernels.onednn_linear import Linear, linear
from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED, RoutingMeta, routing_metadata

__all__ = ["IMPLS", "NOT_CONSULTED", "Linear", "RoutingMeta", "dense_matmul_engines", "knowledge_mlp", "linear",
           "routing_metadata"]

"""Pure ops for the knowledge path: routing metadata, grouped expert MLPs, their oracles.

Importing this package never imports triton; the Triton implementations load on first use.
"""

from kernels.dispatch import IMPLS, knowledge_mlp
from kernels.routing import NOT_CONSULTED, RoutingMeta, routing_metadata

__all__ = ["IMPLS", "NOT_CONSULTED", "RoutingMeta", "knowledge_mlp", "routing_metadata"]

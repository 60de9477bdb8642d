"""Routing metadata: (token, slot) pairs grouped by knowledge expert.

    reference.py        the oracle: a loop over slots, obviously right
    metadata.py         the torch path (sort + bincount + cumsum, no host sync)
    triton_routing.py   the Triton kernel (count and place every slot, no sort)
"""

from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED, RoutingMeta, routing_metadata

__all__ = ["NOT_CONSULTED", "RoutingMeta", "routing_metadata"]

"""Record which knowledge experts each token consulted: ``with record_knowledge_trace(model) as trace:``.

Shape legend: L MoE layers (in block order), B batch, S sequence, K top-k slots, T = B*S tokens.

The recorder hooks the model and each MoE layer's ``KnowledgeRouter`` only inside the ``with``
block, so a model that is not being recorded carries no hooks and pays nothing. Each forward call of
the model inside the block adds one ``TracePass`` (``generate`` adds one per step). Tensors stay on
the model's device and are detached; nothing is read back to the host until you read a pass.

    with record_knowledge_trace(model) as trace:
        model(idx_BS)
    ids_LBSK, gates_LBSK = trace.passes[0].expert_ids_LBSK, trace.passes[0].gates_LBSK

Router calls outside a model forward (a layer called on its own, activation recomputation during
backward) are not recorded: without the model's input they cannot be attributed to tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.moe.model import PureReasonerLM


class TracePass(NamedTuple):
    """Routing of one model forward call.

    token_ids_BS: [B, S] the model's input ids.
    expert_ids_LBSK: [L, B, S, K] int64 expert per slot, ``NOT_CONSULTED`` (-1) for idle slots.
    gates_LBSK: [L, B, S, K] fp32 gate per slot, 0 on idle slots.
    """

    token_ids_BS: torch.Tensor
    expert_ids_LBSK: torch.Tensor
    gates_LBSK: torch.Tensor

    @property
    def consulted_LBS(self) -> torch.Tensor:
        """[L, B, S] bool: the token consulted at least one knowledge expert in that layer."""
        return (self.expert_ids_LBSK != NOT_CONSULTED).any(-1)


class KnowledgeTrace:
    """What ``record_knowledge_trace`` saw: one ``TracePass`` per model forward, in call order.

    moe_blocks: block index of each of the L MoE layers (``model.blocks[i]``).
    num_experts, top_k: E and K of the knowledge path.
    """

    def __init__(self, moe_blocks: list[int], num_experts: int, top_k: int):
        self.moe_blocks = moe_blocks
        self.num_experts = num_experts
        self.top_k = top_k
        self.passes: list[TracePass] = []

    @property
    def num_layers(self) -> int:
        return len(self.moe_blocks)


@contextmanager
def record_knowledge_trace(model: PureReasonerLM) -> Iterator[KnowledgeTrace]:
    """Record the routing of every forward call of ``model`` made inside the ``with`` block.

    Args:
        model: a PureReasonerLM with at least one MoE layer.

    Yields:
        A KnowledgeTrace that fills as the model runs; hooks are removed on exit, even on error.
    """
    layers = model.moe_layers()
    if not layers:
        raise ValueError("model has no MoE layers: there is no knowledge routing to trace")
    kcfg = layers[0].cfg.knowledge
    trace = KnowledgeTrace([i for i, block in enumerate(model.blocks) if block.is_moe], kcfg.num_experts, kcfg.top_k)
    # The pass being recorded: [idx_BS, per-layer (ids_TK, gates_TK) or None]; empty between calls.
    open_pass: list = []

    def start(module, args, kwargs):
        idx_BS = args[0] if args else kwargs["idx_BS"]
        open_pass[:] = [idx_BS.detach(), [None] * len(layers)]

    def routed(index: int):
        def hook(module, args, routing):
            if open_pass:
                open_pass[1][index] = (routing.expert_ids_TK.detach(), routing.gates_TK.detach())

        return hook

    def finish(module, args, kwargs, output):
        idx_BS, per_layer = open_pass
        open_pass.clear()
        trace.passes.append(_assemble(idx_BS, per_layer, kcfg.top_k))

    handles = [
        model.register_forward_pre_hook(start, with_kwargs=True),
        model.register_forward_hook(finish, with_kwargs=True),
        *(layer.router.register_forward_hook(routed(i)) for i, layer in enumerate(layers)),
    ]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def _assemble(idx_BS: torch.Tensor, per_layer: list, top_k: int) -> TracePass:
    """Stack the layers' [T, K] routing into [L, B, S, K]; a layer whose router did not run
    (``knowledge_off``) consulted nothing."""
    shape_BSK = (*idx_BS.shape, top_k)
    ids, gates = [], []
    for routed in per_layer:
        if routed is None:
            ids.append(torch.full(shape_BSK, NOT_CONSULTED, dtype=torch.int64, device=idx_BS.device))
            gates.append(torch.zeros(shape_BSK, dtype=torch.float32, device=idx_BS.device))
        else:
            ids.append(routed[0].view(shape_BSK))
            gates.append(routed[1].view(shape_BSK))
    return TracePass(idx_BS, torch.stack(ids), torch.stack(gates))

"""FLOPs of a pass as PyTorch's FLOP counter sees them, with formulas for the ops it cannot see into, written
from each op's own inputs (never from ``moe.flops``): the knowledge MLP's routed rows, the oneDNN GEMMs' shapes
(``benchmarks.common``), the CPU attention kernel's query/key/value shapes."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from pure_reasoner.benchmarks.common import custom_op_flop_formulas
from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM

SEQ = 24
CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
CPU_ATTENTION_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """scores = q kᵀ and out = scores v, over every (query, key) pair: the causal mask does not shrink the
    matmuls (PaLM's convention too). q [B, H, S, Q], k and v [B, G, S, Q]."""
    batch, heads, seq_q, head_dim = query_shape
    seq_k, value_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * seq_q * seq_k * (head_dim + value_dim)


def _attention_bwd_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Gradients of both operands of both products: twice the forward. The CPU kernel also recomputes the
    scores (flash attention); that is hardware work, which model FLOPs (the MFU convention) leave out."""
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


def counted(fn) -> dict:
    """FLOPs per op of ``fn()``, every op the counter knows plus our formulas."""
    mapping = {CPU_ATTENTION: _attention_flops, CPU_ATTENTION_BWD: _attention_bwd_flops, **custom_op_flop_formulas()}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def exact_rate(model: PureReasonerLM, monkeypatch) -> None:
    """Make every MoE layer route exactly its target share: the first rate * T tokens consult K distinct
    experts, the others none. The real router still runs first, and its gates stay in the graph."""
    for layer in model.moe_layers():
        router, kcfg = layer.router, layer.cfg.knowledge
        real_forward = router.forward

        def forward(x_TD, real_forward=real_forward, kcfg=kcfg):
            routing = real_forward(x_TD)
            num_tokens = x_TD.shape[0]
            consult_T1 = (torch.arange(num_tokens) < round(kcfg.consult_rate * num_tokens)).unsqueeze(1)
            ids_TK = (torch.arange(num_tokens).unsqueeze(1) + torch.arange(kcfg.top_k)) % kcfg.num_experts
            gates_TK = routing.gates_TK + 0.5  # in the graph, so the router gets its backward
            return routing._replace(expert_ids_TK=torch.where(consult_T1, ids_TK, -1),
                                    gates_TK=torch.where(consult_T1, gates_TK, 0.0))

        monkeypatch.setattr(router, "forward", forward)


def _config(mechanism: str) -> ModelConfig:
    """Every part the accountant distinguishes: a dense block, GQA, qkv biases and QK-norm (not matmuls), a
    gated reasoning expert, a router that is a visible share of the cost (so charging it wrongly shows)."""
    rate = 1.0 if mechanism == "always" else 0.25
    knowledge = KnowledgeConfig(num_experts=8, expert_width=24, top_k=2, mechanism=mechanism, num_null_experts=8,
                                consult_rate=rate)
    return ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, max_seq_len=SEQ,
                       qkv_bias=True, qk_norm=True, dense_first_layers=1, dense_width=32, reasoning_width=24,
                       reasoning_gate=True, knowledge=knowledge)


def small_model(mechanism: str) -> PureReasonerLM:
    model = PureReasonerLM(_config(mechanism)).train()
    model.init_weights(std=0.3)  # router margins spread: routing differs token to token
    return model

"""Named model shapes: our own sizes and the published shapes of well-known MoE models.

Published models map onto our vocabulary as: shared experts = the reasoning expert (always on),
routed experts = knowledge experts consulted by every token (mechanism ``always``).
"""

from __future__ import annotations

import copy

from pure_reasoner.moe.config import KnowledgeConfig, ModelConfig


def _ours(d_model: int, n_layers: int, n_heads: int, num_experts: int, seq_len: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=512,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        max_seq_len=seq_len,
        reasoning_width=2 * d_model,
        knowledge=KnowledgeConfig(num_experts=num_experts, expert_width=d_model, top_k=2, num_null_experts=num_experts),
    )


def _published(**kw) -> ModelConfig:
    knowledge = KnowledgeConfig(mechanism="always", consult_rate=1.0, **kw.pop("knowledge"))
    kw.setdefault("reasoning_width", None)
    return ModelConfig(tie_embeddings=False, knowledge=knowledge, **kw)


_PRESETS: dict[str, ModelConfig] = {
    "tiny": _ours(d_model=64, n_layers=2, n_heads=4, num_experts=8, seq_len=128),
    "small": _ours(d_model=256, n_layers=4, n_heads=4, num_experts=32, seq_len=256),
    "base": _ours(d_model=512, n_layers=8, n_heads=8, num_experts=64, seq_len=512),
    # Mixtral of Experts (Jiang et al., 2024): 46.7B total, 12.9B active.
    "mixtral-8x7b": _published(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=32768,
        rope_theta=1e6, knowledge=dict(num_experts=8, expert_width=14336, top_k=2),
    ),
    # OLMoE (Muennighoff et al., 2024): 6.9B total, 1.3B active; QK-norm, no gate renormalisation.
    "olmoe-1b-7b": _published(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, max_seq_len=4096, qk_norm=True,
        knowledge=dict(num_experts=64, expert_width=1024, top_k=8, normalize_gates=False),
    ),
    # Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B active; qkv bias, gated shared expert of width 5632.
    "qwen1.5-moe-a2.7b": _published(
        vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, max_seq_len=8192, qkv_bias=True,
        reasoning_width=5632, reasoning_gate=True,
        knowledge=dict(num_experts=60, expert_width=1408, top_k=4, normalize_gates=False),
    ),
    # DeepSeekMoE 16B (Dai et al., 2024): 16.4B total, 2.8B active; first block dense, 2 shared experts.
    "deepseek-moe-16b": _published(
        vocab_size=102400, d_model=2048, n_layers=28, n_heads=16, max_seq_len=4096,
        dense_first_layers=1, dense_width=10944, reasoning_width=2 * 1408,
        knowledge=dict(num_experts=64, expert_width=1408, top_k=6, normalize_gates=False),
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset (safe to modify)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESET_NAMES}")
    return copy.deepcopy(_PRESETS[name])

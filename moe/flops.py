"""Parameter and FLOPs accounting: nominal (from a config) and realized (from the routing that happened).

Conventions (stated once, used everywhere):
- ``total_params``: every parameter, embeddings included (as published model cards count them).
- ``active_params``: parameters a token touches, embeddings and LM head included, knowledge experts
  counted as ``slot_rate * K`` experts per MoE layer (nominal: the target consult rate).
- FLOPs per token use the matmul parameters ``N`` (active, minus the embedding lookup and the norms,
  plus the LM head even when tied) and the PaLM attention term (Chowdhery et al. 2022, App. B):
  training ``6 N + 12 L H Q S``, inference ``2 N + 4 L H Q S`` for context length S.

CLI: ``python -m moe.flops --preset NAME [--seq-len S] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kernels import dense_matmul_engines
from moe.config import ModelConfig
from moe.layer import MoEStats
from moe.presets import PRESET_NAMES, preset


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one transformer block, by part."""

    attention: int
    norms: int
    dense_ffn: int
    reasoning: int
    router: int
    one_expert: int
    num_experts: int

    @property
    def total(self) -> int:
        return int(self.active(self.num_experts))

    def active(self, experts_per_token: float) -> float:
        """Parameters a token touches when it uses ``experts_per_token`` knowledge experts here."""
        shared = self.attention + self.norms + self.dense_ffn + self.reasoning + self.router
        return shared + experts_per_token * self.one_expert


def block_params(cfg: ModelConfig, index: int) -> BlockParams:
    """Count block ``index`` of ``cfg`` part by part, mirroring ``moe.model.Block``."""
    d, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.attn_head_dim, cfg.kv_heads * cfg.attn_head_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d
    attention += (q_dim + 2 * kv_dim) if cfg.qkv_bias else 0
    attention += (q_dim + kv_dim) if cfg.qk_norm else 0
    if not cfg.is_moe_layer(index):
        return BlockParams(attention, 2 * d, 3 * d * cfg.dense_width, 0, 0, 0, 0)
    k = cfg.knowledge
    reasoning = (3 * d * cfg.reasoning_width if cfg.reasoning_width else 0) + (d if cfg.reasoning_gate else 0)
    router = d * k.num_router_outputs + ((d + 1) if k.mechanism == "gate" else 0)
    return BlockParams(attention, 2 * d, 0, reasoning, router, 3 * d * k.expert_width, k.num_experts)


@dataclass(frozen=True)
class Accounting:
    """Per-token cost of a model.

    ``experts_per_token_per_layer``: each MoE layer's slot_rate * K. ``block_active_params`` and
    ``block_flops_per_token`` (training) break the cost down per transformer block.
    """

    total_params: int
    embedding_params: int
    active_params: float
    active_params_non_embedding: float
    matmul_params: float
    flops_per_token: float
    inference_flops_per_token: float
    attention_flops_per_token: float
    seq_len: int
    experts_per_token_per_layer: list[float]
    block_active_params: list[float]
    block_flops_per_token: list[float]


def _account(cfg: ModelConfig, experts_per_token: Sequence[float], seq_len: int) -> Accounting:
    blocks = [block_params(cfg, i) for i in range(cfg.n_layers)]
    moe_blocks = [b for i, b in enumerate(blocks) if cfg.is_moe_layer(i)]
    if len(experts_per_token) != len(moe_blocks):
        raise ValueError(f"got {len(experts_per_token)} per-layer expert counts for {len(moe_blocks)} MoE layers")
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    epts = iter(experts_per_token)
    block_active = [b.active(next(epts) if cfg.is_moe_layer(i) else 0.0) for i, b in enumerate(blocks)]
    active_blocks = sum(block_active)
    active = embed + head + cfg.d_model + active_blocks
    matmul = active_blocks - sum(b.norms for b in blocks) + embed  # LM head: tied or not, a V x D matmul
    layer_attn_width = cfg.n_heads * cfg.attn_head_dim * seq_len
    attn_width = cfg.n_layers * layer_attn_width
    return Accounting(
        total_params=embed + head + cfg.d_model + sum(b.total for b in blocks),
        embedding_params=embed + head,
        active_params=active,
        active_params_non_embedding=active - embed - head,
        matmul_params=matmul,
        flops_per_token=6 * matmul + 12 * attn_width,
        inference_flops_per_token=2 * matmul + 4 * attn_width,
        attention_flops_per_token=12 * attn_width,
        seq_len=seq_len,
        experts_per_token_per_layer=list(experts_per_token),
        block_active_params=block_active,
        block_flops_per_token=[
            6 * (a - b.norms) + 12 * layer_attn_width for a, b in zip(block_active, blocks, strict=True)
        ],
    )


def nominal(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    """Cost per token when every MoE layer consults at its target rate.

    Args:
        cfg: the model.
        seq_len: context length for the attention term (default ``cfg.max_seq_len``).
    """
    k = cfg.knowledge
    return _account(cfg, [k.consult_rate * k.top_k] * _num_moe(cfg), seq_len or cfg.max_seq_len)


def knowledge_off(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    """Cost per token with every knowledge expert off (the ``knowledge_off`` ablation; the training objective's
    forget pass, ``objective.forget_weight``, costs this much on top of the ordinary step)."""
    return _account(cfg, [0.0] * _num_moe(cfg), seq_len or cfg.max_seq_len)


def _num_moe(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def realized(cfg: ModelConfig, stats: Sequence[MoEStats], seq_len: int) -> Accounting:
    """Cost per token of a forward pass, from the routing each MoE layer reported.

    Reads the stats back to the host: call it for logging, never inside the model.

    Args:
        cfg: the model that produced ``stats``.
        stats: one MoEStats per MoE layer, in order (``LMOutput.stats``).
        seq_len: context length of that pass.
    """
    per_layer = [float(s.expert_load_E.sum()) / max(s.num_tokens, 1) for s in stats]
    return _account(cfg, per_layer, seq_len)


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul on this process's threads, the best engine's median of ``repeats``.

    The denominator of MFU. Every engine counts (on CPU fp32: MKL's ``torch.mm`` and oneDNN, ~2x apart on
    non-Intel CPUs): a peak of the slower one would flatter the model, which runs on the faster one.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 0.0
    for mm in dense_matmul_engines(a).values():
        mm(a, b)  # warm-up: thread pool start, first-touch of the output
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mm(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.flops", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, choices=PRESET_NAMES)
    parser.add_argument("--seq-len", type=int, default=None, help="context length (default: the preset's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len <= 0:
        parser.error(f"--seq-len must be > 0, got {args.seq_len}")
    report = asdict(nominal(preset(args.preset), args.seq_len))
    report["preset"] = args.preset
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:>30}: {shown}")


if __name__ == "__main__":
    main()

"""Parameter and FLOPs accounting: nominal (from a config) and realized (from the routing that happened).

Conventions (stated once, used everywhere):
- ``total_params``: every parameter, embeddings included (as published model cards count them).
- ``active_params``: parameters a token touches, embeddings and LM head included, knowledge experts
  counted as ``slot_rate * K`` experts per MoE layer (nominal: the target consult rate).
- FLOPs per token count model FLOPs (MFU's convention: no recomputation): 2 per multiply-add of a weight
  matrix, forward; twice that backward (the input's and the weight's gradient) for every matrix the loss
  reaches. ``N``, the matmul parameters, are the weight matrices a token's forward meets: active parameters
  minus the embedding lookup, norm gains and biases (elementwise work, not matmuls), plus the LM head even
  when tied. Attention adds the PaLM term (Chowdhery et al. 2022, App. B) for context length S: ``4 L H Q S``
  forward, twice that backward. A full training pass: ``6 N + 12 L H Q S``; inference ``2 N + 4 L H Q S``.
- Passes that skip part of the layer pay only for what runs: ``knowledge_off`` runs neither router nor
  experts; ``knowledge_mean`` (``moe.interventions.knowledge_mean``) runs both forward only (the ablation detaches the
  knowledge path), or forward and backward when the mean keeps its gradient (``detach=False``).

CLI: ``python -m pure_reasoner.moe.flops --preset NAME [--seq-len S] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pure_reasoner.kernels import dense_matmul_engines
from pure_reasoner.moe.config import ModelConfig
from pure_reasoner.moe.layer import MoEStats
from pure_reasoner.moe.presets import PRESET_NAMES, preset

# Model FLOPs per weight per token: forward (one multiply-add), backward (input and weight gradients).
FWD_FLOPS_PER_PARAM, BWD_FLOPS_PER_PARAM = 2, 4


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one transformer block, by part.

    attention, dense_ffn, reasoning, router: weight matrices (matmul parameters); ``router`` includes the
    ``gate`` mechanism's consult projection. norms: norm gains and biases of the parts every token runs
    (pre-norms, QK-norm, qkv biases); router_bias: the consult gate's bias. one_expert: one knowledge
    expert's weights.
    """

    attention: int
    norms: int
    dense_ffn: int
    reasoning: int
    router: int
    one_expert: int
    num_experts: int
    router_bias: int = 0

    @property
    def total(self) -> int:
        return int(self.active(self.num_experts))

    def active(self, experts_per_token: float, router: bool = True) -> float:
        """Parameters a token touches when it uses ``experts_per_token`` knowledge experts here (and the
        router, unless ``router`` is False)."""
        routing = self.router + self.router_bias if router else 0
        return self.attention + self.norms + self.dense_ffn + self.reasoning + routing + \
            experts_per_token * self.one_expert

    def matmul(self, experts_per_token: float, router: bool = True) -> float:
        """Weight-matrix parameters a token's forward meets here (norms and biases excluded)."""
        return self.attention + self.dense_ffn + self.reasoning + (self.router if router else 0) + \
            experts_per_token * self.one_expert


def block_params(cfg: ModelConfig, index: int) -> BlockParams:
    """Count block ``index`` of ``cfg`` part by part, mirroring ``moe.model.Block``."""
    d, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.attn_head_dim, cfg.kv_heads * cfg.attn_head_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d
    norms = 2 * d + ((q_dim + 2 * kv_dim) if cfg.qkv_bias else 0) + ((q_dim + kv_dim) if cfg.qk_norm else 0)
    if not cfg.is_moe_layer(index):
        return BlockParams(attention, norms, 3 * d * cfg.dense_width, 0, 0, 0, 0)
    knowledge = cfg.knowledge
    reasoning = (3 * d * cfg.reasoning_width if cfg.reasoning_width else 0) + (d if cfg.reasoning_gate else 0)
    gate = knowledge.mechanism == "gate"
    router = d * knowledge.num_router_outputs + (d if gate else 0)
    return BlockParams(attention, norms, 0, reasoning, router, 3 * d * knowledge.expert_width, knowledge.num_experts,
                       int(gate))


@dataclass(frozen=True)
class Accounting:
    """Per-token cost of a model.

    ``experts_per_token_per_layer``: each MoE layer's slot_rate * K. ``block_active_params`` and
    ``block_flops_per_token`` (training) break the cost down per transformer block. ``matmul_params``: the
    forward's N.
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


def _account(
    cfg: ModelConfig, experts_per_token: Sequence[float], seq_len: int, router: bool = True,
    knowledge_backward: bool = True,
) -> Accounting:
    """The cost of a training pass; ``router``: whether the routers run; ``knowledge_backward``: whether
    routers and experts get a backward."""
    blocks = [block_params(cfg, i) for i in range(cfg.n_layers)]
    moe_blocks = [b for i, b in enumerate(blocks) if cfg.is_moe_layer(i)]
    if len(experts_per_token) != len(moe_blocks):
        raise ValueError(f"got {len(experts_per_token)} per-layer expert counts for {len(moe_blocks)} MoE layers")
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    epts = iter(experts_per_token)
    per_block = [next(epts) if cfg.is_moe_layer(i) else 0.0 for i in range(cfg.n_layers)]
    block_active = [b.active(e, router) for b, e in zip(blocks, per_block, strict=True)]
    fwd = [b.matmul(e, router) for b, e in zip(blocks, per_block, strict=True)]
    bwd = fwd if knowledge_backward else [b.matmul(0.0, router=False) for b in blocks]
    layer_attn_width = cfg.n_heads * cfg.attn_head_dim * seq_len
    attn_width = cfg.n_layers * layer_attn_width
    block_flops = [FWD_FLOPS_PER_PARAM * f + BWD_FLOPS_PER_PARAM * b + 12 * layer_attn_width
                   for f, b in zip(fwd, bwd, strict=True)]
    matmul = sum(fwd) + embed  # LM head: tied or not, a V x D matmul
    active = embed + head + cfg.d_model + sum(block_active)
    return Accounting(
        total_params=embed + head + cfg.d_model + sum(b.total for b in blocks),
        embedding_params=embed + head,
        active_params=active,
        active_params_non_embedding=active - embed - head,
        matmul_params=matmul,
        flops_per_token=sum(block_flops) + (FWD_FLOPS_PER_PARAM + BWD_FLOPS_PER_PARAM) * embed,
        inference_flops_per_token=FWD_FLOPS_PER_PARAM * matmul + 4 * attn_width,
        attention_flops_per_token=12 * attn_width,
        seq_len=seq_len,
        experts_per_token_per_layer=list(experts_per_token),
        block_active_params=block_active,
        block_flops_per_token=block_flops,
    )


def _nominal_experts(cfg: ModelConfig) -> list[float]:
    knowledge = cfg.knowledge
    return [knowledge.consult_rate * knowledge.top_k] * sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def _realized_experts(stats: Sequence[MoEStats]) -> list[float]:
    """Routed rows per token of each layer (reads the stats back to the host)."""
    return [float(s.expert_load_E.sum()) / max(s.num_tokens, 1) for s in stats]


def nominal(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    """Cost per token when every MoE layer consults at its target rate.

    Args:
        cfg: the model.
        seq_len: context length for the attention term (default ``cfg.max_seq_len``).
    """
    return _account(cfg, _nominal_experts(cfg), seq_len or cfg.max_seq_len)


def knowledge_off(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    """Cost per token with the knowledge path off (the ``knowledge_off`` ablation: no router, no expert; the
    training objective's forget pass, ``objective.forget_weight``, costs this much on top of the ordinary step
    with ``objective.forget_ablation=knowledge_off``)."""
    return _account(cfg, [0.0] * len(_nominal_experts(cfg)), seq_len or cfg.max_seq_len, router=False)


def knowledge_mean(cfg: ModelConfig, seq_len: int | None = None, stats: Sequence[MoEStats] | None = None,
                   detached: bool = True) -> Accounting:
    """Cost per token of a training pass under the ``knowledge_mean`` ablation (the forget pass with
    ``objective.forget_ablation=recall_mean``): routers and routed experts run forward only, since the ablation
    detaches the knowledge path; everything else forward and backward.

    Args:
        cfg: the model.
        seq_len: context length (default ``cfg.max_seq_len``).
        stats: that pass's MoEStats per MoE layer (its routed rows); None: the target consult rate.
        detached: False for ``knowledge_mean(detach=False)`` (``objective.mean_grad``): the mean keeps its
            gradient, so routers and experts run backward too (a full training pass on those rows).
    """
    experts = _nominal_experts(cfg) if stats is None else _realized_experts(stats)
    return _account(cfg, experts, seq_len or cfg.max_seq_len, knowledge_backward=not detached)


def realized(cfg: ModelConfig, stats: Sequence[MoEStats], seq_len: int) -> Accounting:
    """Cost per token of a training pass that ran every router, from the routing each MoE layer reported
    (a pass with the knowledge path off costs ``knowledge_off``).

    Reads the stats back to the host: call it for logging, never inside the model.

    Args:
        cfg: the model that produced ``stats``.
        stats: one MoEStats per MoE layer, in order (``LMOutput.stats``).
        seq_len: context length of that pass.
    """
    return _account(cfg, _realized_experts(stats), seq_len)


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
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.moe.flops", description=__doc__.split("\n")[0])
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

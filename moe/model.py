"""PureReasonerLM: a decoder-only transformer whose FFNs are PureReasonerMoE layers.

Shape legend: B batch, S sequence, D model dim, H query heads, G key/value heads, Q head dim,
V vocabulary.

Pre-norm blocks (RMSNorm), rotary positions, causal SDPA with optional grouped-query attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.kernels import Linear, linear
from pure_reasoner.moe.config import ModelConfig
from pure_reasoner.moe.experts import SwiGLU
from pure_reasoner.moe.layer import MoEStats, PureReasonerMoE


class LMOutput(NamedTuple):
    """logits_BSV; loss (cross-entropy + aux, or None without targets); aux_loss; stats per MoE layer."""

    logits_BSV: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    stats: list[MoEStats]


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [S, Q/2] for rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SQ = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SQ.cos(), angles_SQ.sin()


def apply_rope(x_BHSQ: torch.Tensor, cos_SQ: torch.Tensor, sin_SQ: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of each head by position."""
    x1, x2 = x_BHSQ.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_SQ - x2 * sin_SQ, x1 * sin_SQ + x2 * cos_SQ], dim=-1)
    return rotated.to(x_BHSQ.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE, optional GQA, qkv bias and QK-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.wq = Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.wk = Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = Linear(q_dim, cfg.d_model, bias=False)
        # OLMoE-style QK-norm over the whole projection.
        self.q_norm = nn.RMSNorm(q_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(kv_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def queries_keys(self, x_BSD: torch.Tensor, cos_SQ: torch.Tensor,
                     sin_SQ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries [B, H, S, Q] and keys [B, G, S, Q] of x_BSD (QK-normed where the model is), as the
        attention scores them; public so that diagnostics can recompute attention weights."""
        batch, seq, _ = x_BSD.shape
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSQ = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSQ = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q_BHSQ, cos_SQ, sin_SQ), apply_rope(k_BGSQ, cos_SQ, sin_SQ)

    def forward(self, x_BSD: torch.Tensor, cos_SQ: torch.Tensor, sin_SQ: torch.Tensor,
                mask_B1SS: torch.Tensor | None = None) -> torch.Tensor:
        """mask_B1SS: None (causal over the whole sequence) or [B, 1, S, S] bool, True where a query may attend."""
        batch, seq, _ = x_BSD.shape
        q_BHSQ, k_BGSQ = self.queries_keys(x_BSD, cos_SQ, sin_SQ)
        v_BGSQ = self.wv(x_BSD).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out_BHSQ = F.scaled_dot_product_attention(
            q_BHSQ, k_BGSQ, v_BGSQ, attn_mask=mask_B1SS, is_causal=mask_B1SS is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.wo(out_BHSQ.transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is a PureReasonerMoE or a dense SwiGLU."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.ffn = PureReasonerMoE(cfg.moe_config()) if self.is_moe else SwiGLU(cfg.d_model, cfg.dense_width)

    def forward(self, x_BSD, cos_SQ, sin_SQ, mask_B1SS=None, knowledge_off: bool = False):
        """x_BSD [B, S, D] -> (x_BSD, the FFN's MoEStats or None for a dense block)."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SQ, sin_SQ, mask_B1SS)
        h_BSD = self.ffn_norm(x_BSD)
        if not self.is_moe:
            return x_BSD + self.ffn(h_BSD), None
        y_BSD, stats = self.ffn(h_BSD, knowledge_off=knowledge_off)
        return x_BSD + y_BSD, stats


class PureReasonerLM(nn.Module):
    """Decoder-only LM. ``forward(idx_BS, targets_BS)`` returns an ``LMOutput``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos_SQ, sin_SQ = rope_tables(cfg.max_seq_len, cfg.attn_head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos_SQ, persistent=False)
        self.register_buffer("rope_sin", sin_SQ, persistent=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style: Normal(0, std), residual output projections scaled by 1/sqrt(2 * layers)."""
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif "norm" in name:
                nn.init.ones_(param)
            elif name.endswith(("wo.weight", "w2.weight", "w2_EFD")):
                nn.init.normal_(param, std=out_std)
            else:
                nn.init.normal_(param, std=std)
        for layer in self.moe_layers():
            layer.router.reset_controller()  # its threshold must match the new weights

    def moe_layers(self) -> list[PureReasonerMoE]:
        return [block.ffn for block in self.blocks if block.is_moe]

    def forward(
        self,
        idx_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        *,
        knowledge_off: bool = False,
        doc_ids_BS: torch.Tensor | None = None,
    ) -> LMOutput:
        """Args: idx_BS [B, S] token ids; targets_BS [B, S] (-100 = ignore); knowledge_off: no MoE layer consults
        its knowledge experts (``PureReasonerMoE.forward``); doc_ids_BS [B, S] integer or None: the document each
        token belongs to (non-decreasing along S) for packed sequences: a token attends only to earlier tokens of its
        own document, so it sees what it would see at the start of a sequence of its own (RoPE depends on relative
        positions only), as in eval and generation. Research interventions (reasoning off, mean ablations, gradient
        routing) are applied from outside by ``moe.interventions``; consult supervision is a training objective
        (``train.objectives.consult_supervision``) on the stats' consult logits.

        Returns: LMOutput (logits [B, S, V]).
        """
        if idx_BS.dim() != 2 or idx_BS.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx_BS must be a 2-D integer tensor, got {idx_BS.dtype} {tuple(idx_BS.shape)}")
        seq = idx_BS.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mask_B1SS = None
        if doc_ids_BS is not None:
            if doc_ids_BS.shape != idx_BS.shape:
                raise ValueError(f"doc_ids_BS must have the shape of idx_BS {tuple(idx_BS.shape)}, got "
                                 f"{tuple(doc_ids_BS.shape)}")
            causal_SS = torch.ones(seq, seq, dtype=torch.bool, device=idx_BS.device).tril()
            mask_B1SS = ((doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]) & causal_SS).unsqueeze(1)
        x_BSD = self.embed(idx_BS)
        cos_SQ, sin_SQ = self.rope_cos[:seq], self.rope_sin[:seq]
        all_stats = []
        for block in self.blocks:
            x_BSD, stats = block(x_BSD, cos_SQ, sin_SQ, mask_B1SS, knowledge_off)
            if stats is not None:
                all_stats.append(stats)
        x_BSD = self.norm(x_BSD)
        logits_BSV = self.lm_head(x_BSD) if self.lm_head is not None else linear(x_BSD, self.embed.weight)
        aux_loss = sum((s.aux_loss for s in all_stats), x_BSD.new_zeros((), dtype=torch.float32))
        loss = None
        if targets_BS is not None:
            ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=-100)
            loss = ce + aux_loss
        return LMOutput(logits_BSV, loss, aux_loss, all_stats)

    @torch.no_grad()
    def update_controllers(self, stats: list[MoEStats]) -> None:
        """Apply each MoE layer's consult-rate and balance update from its stats."""
        for layer, layer_stats in zip(self.moe_layers(), stats, strict=True):
            layer.update_controller(layer_stats)

    @torch.no_grad()
    def generate(
        self,
        idx_BS: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        knowledge_off: bool = False,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens; greedy (argmax) or sampled with temperature and top-k.

        Returns: [B, S + max_new_tokens] token ids.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        for _ in range(max_new_tokens):
            context_BS = idx_BS[:, -self.cfg.max_seq_len :]
            logits_BV = self(context_BS, knowledge_off=knowledge_off).logits_BSV[:, -1]
            if greedy:
                next_B1 = logits_BV.argmax(-1, keepdim=True)
            else:
                logits_BV = logits_BV.float() / temperature
                if top_k is not None:
                    kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
                next_B1 = torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)
            idx_BS = torch.cat([idx_BS, next_B1], dim=1)
        return idx_BS

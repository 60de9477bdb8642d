"""Typed configs for the layer and the model. Every field is validated on construction.

Plain dataclasses of primitives, so Hydra's ConfigStore can hold them as structured configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pure_reasoner.kernels import IMPLS

MECHANISMS = ("gate", "null", "always")


def _positive(owner: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def _non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


@dataclass
class KnowledgeConfig:
    """The sparse knowledge path: experts, router, consult controller, balance.

    mechanism:
        ``gate``: a per-token sigmoid consult gate decides whether to consult, then top-k among the E
        real experts. ``null``: top-k over E real plus N null experts; null slots cost nothing and a
        token whose k slots are all null consults nothing. ``always``: plain top-k, every token
        consults (the conventional MoE; used by baselines and published presets).
    consult_rate: target share of the T*K slots that go to real experts (``gate``: share of tokens
        that consult). The controller (``moe.router``) holds it with a per-layer margin threshold, re-taken
        after every optimizer step as the rate's quantile over the last ``reference_tokens`` router inputs
        (one or two steps), plus a feedback term whose step is ``controller_step``.
    consult_loss_coef: weight of the supervised consult loss (``gate`` only): when the model is given
        per-token consult targets, BCE of each layer's consult logit against them joins the aux loss.
    saved_rows_factor, saved_rows_min: the knowledge path keeps activations for the backward on at most
        ``ceil(saved_rows_factor * consult_rate * T*K) + saved_rows_min`` routed rows (``moe.experts``), a
        bound from shapes only (no host sync). Routed rows past it are recomputed in the backward (exact,
        slower) and counted in ``MoEStats.overflow_rows``; never dropped. The controller holds the rate
        within about 20% of target, so 1.5x leaves headroom; the floor covers small batches' noise.
    deterministic: combine each token's expert outputs in slot order (no atomics; Triton launch configs
        pinned), so results do not depend on the order of the routed rows or the GPU's thread schedule.
    tf32: the Triton path's fp32 dots run on tensor cores in TF32 (about 8x the FMA rate on an H100,
        ~1e-3 relative error per product; for training). Off: exact IEEE fp32, as the tests require.
        The other implementations ignore it (torch follows ``torch.backends.cuda.matmul.allow_tf32``).
    """

    num_experts: int = 16
    expert_width: int = 256
    top_k: int = 2
    mechanism: str = "gate"
    num_null_experts: int = 16
    consult_rate: float = 0.125
    controller_step: float = 0.05
    reference_tokens: int = 2048
    balance_step: float = 1e-3
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    consult_loss_coef: float = 0.0
    normalize_gates: bool = True
    impl: str = "torch"
    saved_rows_factor: float = 1.5
    saved_rows_min: int = 64
    deterministic: bool = False
    tf32: bool = False

    def __post_init__(self) -> None:
        _positive("knowledge", num_experts=self.num_experts, expert_width=self.expert_width, top_k=self.top_k,
                  reference_tokens=self.reference_tokens)
        if self.top_k > self.num_experts:
            raise ValueError(f"knowledge.top_k={self.top_k} exceeds knowledge.num_experts={self.num_experts}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"knowledge.mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.mechanism == "null":
            _positive("knowledge", num_null_experts=self.num_null_experts)
        if not 0.0 <= self.consult_rate <= 1.0:
            raise ValueError(f"knowledge.consult_rate must be in [0, 1], got {self.consult_rate}")
        if self.mechanism == "always" and self.consult_rate != 1.0:
            raise ValueError(f"knowledge.consult_rate must be 1.0 with mechanism 'always', got {self.consult_rate}")
        _non_negative(
            "knowledge",
            controller_step=self.controller_step,
            balance_step=self.balance_step,
            balance_loss_coef=self.balance_loss_coef,
            z_loss_coef=self.z_loss_coef,
            consult_loss_coef=self.consult_loss_coef,
        )
        if self.consult_loss_coef and self.mechanism != "gate":
            raise ValueError(f"knowledge.consult_loss_coef needs mechanism 'gate', got {self.mechanism!r}")
        if self.saved_rows_factor < 1.0:
            raise ValueError(f"knowledge.saved_rows_factor must be >= 1 (the bound's headroom over the target "
                             f"rate), got {self.saved_rows_factor}")
        _non_negative("knowledge", saved_rows_min=self.saved_rows_min)
        if self.impl not in IMPLS:
            raise ValueError(f"knowledge.impl must be one of {IMPLS}, got {self.impl!r}")

    @property
    def saved_row_share(self) -> float:
        """Share of the T*K slots the knowledge path keeps activations for, before the floor."""
        return self.saved_rows_factor * self.consult_rate

    @property
    def num_router_outputs(self) -> int:
        """Router logits per token: E real experts, plus N nulls for the ``null`` mechanism."""
        return self.num_experts + (self.num_null_experts if self.mechanism == "null" else 0)


@dataclass
class MoEConfig:
    """One PureReasonerMoE layer: the always-on reasoning expert plus the knowledge path.

    reasoning_width: F_r of the dense SwiGLU every token uses; ``None`` for no reasoning expert
        (a conventional top-k MoE).
    reasoning_gate: scale the reasoning expert by a learned per-token sigmoid (Qwen-MoE's shared
        expert gate).
    """

    d_model: int = 256
    reasoning_width: int | None = 512
    reasoning_gate: bool = False
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)

    def __post_init__(self) -> None:
        _positive("moe", d_model=self.d_model, reasoning_width=self.reasoning_width)


@dataclass
class ModelConfig:
    """A decoder-only LM whose FFNs are PureReasonerMoE layers.

    Block i is dense (SwiGLU of ``dense_width``) when ``i < dense_first_layers`` or
    ``(i - dense_first_layers) % moe_every != 0``; otherwise it is a MoE layer.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    dense_first_layers: int = 0
    moe_every: int = 1
    dense_width: int | None = None
    reasoning_width: int | None = 512
    reasoning_gate: bool = False
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)

    def __post_init__(self) -> None:
        _positive(
            "model",
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            max_seq_len=self.max_seq_len,
            moe_every=self.moe_every,
            dense_width=self.dense_width,
            reasoning_width=self.reasoning_width,
        )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not a multiple of model.n_heads={self.n_heads}")
        if self.attn_head_dim % 2:
            raise ValueError(f"model head dim must be even for RoPE, got {self.attn_head_dim}")
        if not 0 <= self.dense_first_layers <= self.n_layers:
            raise ValueError(f"model.dense_first_layers must be in [0, n_layers], got {self.dense_first_layers}")
        if self.dense_width is None and any(not self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ValueError("model.dense_width must be set when some blocks are dense")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` carries a PureReasonerMoE (else a dense SwiGLU)."""
        return index >= self.dense_first_layers and (index - self.dense_first_layers) % self.moe_every == 0

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            d_model=self.d_model,
            reasoning_width=self.reasoning_width,
            reasoning_gate=self.reasoning_gate,
            knowledge=self.knowledge,
        )

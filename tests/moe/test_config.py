"""Bad config values raise ValueError naming the field and the value."""

import pytest

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, MoEConfig

CASES = [
    (KnowledgeConfig, dict(num_experts=4, top_k=5), "top_k=5"),
    (KnowledgeConfig, dict(consult_rate=1.5), "consult_rate must be in \\[0, 1\\], got 1.5"),
    (KnowledgeConfig, dict(consult_rate=-0.1), "consult_rate must be in \\[0, 1\\], got -0.1"),
    (KnowledgeConfig, dict(expert_width=0), "expert_width must be > 0, got 0"),
    (KnowledgeConfig, dict(num_experts=-2), "num_experts must be > 0, got -2"),
    (KnowledgeConfig, dict(top_k=0), "top_k must be > 0, got 0"),
    (KnowledgeConfig, dict(mechanism="oracle"), "mechanism must be one of .* got 'oracle'"),
    (KnowledgeConfig, dict(mechanism="null", num_null_experts=0), "num_null_experts must be > 0, got 0"),
    (KnowledgeConfig, dict(mechanism="always", consult_rate=0.5), "consult_rate must be 1.0"),
    (KnowledgeConfig, dict(z_loss_coef=-1.0), "z_loss_coef must be >= 0, got -1.0"),
    (KnowledgeConfig, dict(impl="cuda-magic"), "impl must be one of .* got 'cuda-magic'"),
    (KnowledgeConfig, dict(saved_rows_factor=0.5), "saved_rows_factor must be >= 1 .* got 0.5"),
    (KnowledgeConfig, dict(saved_rows_min=-1), "saved_rows_min must be >= 0, got -1"),
    (MoEConfig, dict(reasoning_width=0), "reasoning_width must be > 0, got 0"),
    (MoEConfig, dict(d_model=-8), "d_model must be > 0, got -8"),
    (ModelConfig, dict(n_heads=3, d_model=64), "d_model=64 is not a multiple of model.n_heads=3"),
    (ModelConfig, dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
    (ModelConfig, dict(dense_first_layers=1), "dense_width must be set"),
    (ModelConfig, dict(dense_first_layers=9), "dense_first_layers must be in"),
    (ModelConfig, dict(max_seq_len=0), "max_seq_len must be > 0, got 0"),
    (ModelConfig, dict(d_model=36, n_heads=4), "head dim must be even for RoPE, got 9"),
]


@pytest.mark.parametrize("cls,kwargs,match", CASES, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in CASES])
def test_bad_values_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_reasoning_expert_can_be_absent():
    assert MoEConfig(reasoning_width=None).reasoning_width is None

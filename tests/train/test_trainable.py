"""train.trainable: which parameters a knowledge update trains, and the config checks around it."""

import pytest

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.train.trainable import set_trainable
from tests.train.helpers import compose_config

TINY = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, reasoning_width=48,
                   knowledge=KnowledgeConfig(num_experts=4, expert_width=24, top_k=2, mechanism="gate"),
                   reasoning_gate=True)


def _knowledge_by_name(name: str) -> bool:
    # The oracle: the layer's attribute names (moe.layer.PureReasonerMoE.router / .experts), read off the names.
    return ".ffn.router." in name or ".ffn.experts." in name


def test_knowledge_leaves_only_experts_and_routers_trainable():
    model = PureReasonerLM(TINY)
    frozen = set_trainable(model, "knowledge")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if _knowledge_by_name(n)}
    assert any(".router.consult_proj." in n for n in trainable)  # the gate mechanism's consult decision too
    assert any(".experts." in n for n in trainable) and not any("reasoning" in n for n in trainable)
    assert set(frozen) == {n for n, _ in model.named_parameters()} - trainable
    assert set_trainable(PureReasonerLM(TINY), "all") == []
    assert all(p.requires_grad for p in PureReasonerLM(TINY).parameters())


def test_experts_leaves_only_the_expert_weights_trainable():
    model = PureReasonerLM(TINY)
    frozen = set_trainable(model, "experts")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".ffn.experts." in n}
    assert set(frozen) == {n for n, _ in model.named_parameters()} - trainable


def test_knowledge_on_a_dense_model_or_an_unknown_mode_is_refused():
    dense = ModelConfig(**{**TINY.__dict__, "dense_first_layers": 3, "dense_width": 64})
    with pytest.raises(ValueError, match="trainable=knowledge needs MoE layers"):
        set_trainable(PureReasonerLM(dense), "knowledge")
    with pytest.raises(ValueError, match="one of .*'some'"):
        set_trainable(PureReasonerLM(TINY), "some")


def test_config_checks_trainable():
    with pytest.raises(ValueError, match="trainable=knowledge.*MoE layers"):
        compose_config("experiment=decoupling", "name=x", "model=tiny_dense", "train.trainable=knowledge",
                       "train.init_from=somewhere")
    with pytest.raises(ValueError, match="trainable=reasoner splits the knowledge path.*MoE layers"):
        compose_config("experiment=decoupling", "name=x", "model=tiny_dense", "train.trainable=reasoner",
                       "train.init_from=somewhere")
    with pytest.raises(ValueError, match="set train.init_from"):
        compose_config("experiment=decoupling", "name=x", "train.trainable=knowledge")
    with pytest.raises(ValueError, match="train.trainable must be one of"):
        compose_config("train.trainable=heads")
    cfg = compose_config("experiment=decoupling", "name=x", "train.trainable=knowledge", "train.init_from=somewhere")
    assert cfg.train.trainable == "knowledge"


def test_reasoner_freezes_exactly_what_knowledge_trains():
    model = PureReasonerLM(TINY)
    frozen = set_trainable(model, "reasoner")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(frozen) == {n for n, _ in model.named_parameters() if _knowledge_by_name(n)}
    assert trainable == {n for n, _ in model.named_parameters()} - set(frozen)
    assert any("reasoning" in n for n in trainable) and any("attn" in n for n in trainable)
    with pytest.raises(ValueError, match="trainable=reasoner needs MoE layers"):
        set_trainable(PureReasonerLM(ModelConfig(**{**TINY.__dict__, "dense_first_layers": 3, "dense_width": 64})),
                      "reasoner")

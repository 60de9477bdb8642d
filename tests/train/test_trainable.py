"""train.trainable: which parameters a knowledge update trains, and the config checks around it."""

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.train.trainable import call_always_on_detached, knowledge_parameter_names, set_trainable
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


def _grads(model: PureReasonerLM, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_always_on_detached_call_trains_only_the_knowledge_path():
    # The oracle: the plain call's gradients, which detaching weights must keep for the knowledge parameters (the
    # activations still carry the gradient through every detached weight) and drop for every other one.
    torch.manual_seed(0)
    model = PureReasonerLM(TINY).eval()  # eval: no sampling noise, so both calls route alike
    idx_BS, targets_BS = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    knowledge = {n for n, _ in model.named_parameters() if _knowledge_by_name(n)}
    assert knowledge_parameter_names(model) == knowledge
    plain = model(idx_BS, targets_BS=targets_BS)
    detached = call_always_on_detached(model, knowledge, idx_BS=idx_BS, targets_BS=targets_BS)
    assert torch.equal(detached.logits_BSV, plain.logits_BSV)
    want, got = _grads(model, plain.loss), _grads(model, detached.loss)
    assert set(got) == set(want) & knowledge
    assert any(".ffn.experts." in n for n in got) and any(".ffn.router." in n for n in got)
    # the lowest MoE layer's experts get theirs only through the layers above it, whose weights are detached
    first = min(i for i in range(TINY.n_layers) if TINY.is_moe_layer(i))
    assert first < TINY.n_layers - 1 and any(n.startswith(f"blocks.{first}.ffn.experts.") for n in got)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # nothing stays detached after the call


def test_config_checks_always_on_grad():
    base = ("experiment=relocate_keys_cf_release_copy_release_both_anchored_consulting", "name=x")
    cfg = compose_config(*base, "objective.always_on_grad=ablated")
    assert cfg.objective.always_on_grad == "ablated"
    with pytest.raises(ValueError, match="always_on_grad must be one of"):
        compose_config(*base, "objective.always_on_grad=some")
    with pytest.raises(ValueError, match="always_on_grad='ablated'.*forget_weight or read_weight > 0"):
        compose_config(*base, "objective.always_on_grad=ablated", "objective.forget_weight=0",
                       "objective.read_weight=0")
    with pytest.raises(ValueError, match="always_on_grad='ablated'.*train.trainable=all, got 'knowledge'"):
        compose_config(*base, "objective.always_on_grad=ablated", "train.trainable=knowledge")


@pytest.mark.parametrize("always_on_grad", ["all", "ablated"])
def test_the_loop_detaches_the_always_on_path_in_the_knowledge_on_pass_only_when_asked(tmp_path, monkeypatch,
                                                                                       always_on_grad):
    from pure_reasoner.train import loop
    from tests.train.helpers import run_in_process

    calls = []

    def spy(model, knowledge, **inputs):
        calls.append((set(knowledge), {n for n, _ in model.named_parameters() if _knowledge_by_name(n)}))
        return call_always_on_detached(model, knowledge, **inputs)

    monkeypatch.setattr(loop, "call_always_on_detached", spy)
    run_in_process(tmp_path / "run", "data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny",
                   "data.seq_len=384", "model.max_seq_len=384", "data.max_chars=null", "objective.forget_weight=1.0",
                   "objective.read_weight=0.5", "train.max_steps=2", "train.warmup_steps=1", "train.ckpt_every=2",
                   f"objective.always_on_grad={always_on_grad}")
    if always_on_grad == "all":
        assert calls == []
        return
    assert len(calls) == 2  # one knowledge-on pass per micro-batch, grad_accum 1
    for named, expected in calls:
        assert named == expected and named

"""PureReasonerLM: shapes, ablations, generation, and that it learns."""

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM, reasoning_off


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, reasoning_width=48,
                knowledge=KnowledgeConfig(num_experts=4, expert_width=32, consult_rate=0.5))
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "default": {},
    "gqa-untied": dict(n_kv_heads=2, tie_embeddings=False),
    "dense-first-every-2nd": dict(dense_first_layers=1, moe_every=2, dense_width=64),
    "qkv-bias-qk-norm": dict(qkv_bias=True, qk_norm=True),
    "no-reasoning-expert": dict(reasoning_width=None),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(variant):
    cfg = _cfg(**VARIANTS[variant])
    model = PureReasonerLM(cfg)
    idx_BS = torch.randint(0, 64, (2, 17))
    out = model(idx_BS, idx_BS)
    assert out.logits_BSV.shape == (2, 17, 64)
    assert len(out.stats) == sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [], no_grad


def test_causal():
    model = PureReasonerLM(_cfg(knowledge=KnowledgeConfig(num_experts=4, expert_width=32, mechanism="always",
                                                          consult_rate=1.0)))
    idx_BS = torch.randint(0, 64, (1, 12))
    changed = idx_BS.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    torch.testing.assert_close(model(idx_BS).logits_BSV[:, :8], model(changed).logits_BSV[:, :8])


def test_ablation_switches():
    model = PureReasonerLM(_cfg())
    idx_BS = torch.randint(0, 64, (2, 16))
    full = model(idx_BS)
    no_knowledge = model(idx_BS, knowledge_off=True)
    with reasoning_off(model):
        no_reasoning = model(idx_BS)
    assert all(float(s.expert_load_E.sum()) == 0 for s in no_knowledge.stats)
    assert sum(float(s.expert_load_E.sum()) for s in full.stats) > 0
    assert not torch.allclose(full.logits_BSV, no_knowledge.logits_BSV)
    assert not torch.allclose(full.logits_BSV, no_reasoning.logits_BSV)
    with reasoning_off(model):
        both = model(idx_BS, knowledge_off=True)
        for layer in model.moe_layers():  # with both off each MoE layer adds exactly zero
            assert layer(torch.randn(3, 32), knowledge_off=True)[0].abs().max() == 0
    assert both.logits_BSV.shape == full.logits_BSV.shape


def test_generate_greedy_and_sampling():
    model = PureReasonerLM(_cfg()).eval()
    prompt = torch.randint(0, 64, (2, 5))
    a = model.generate(prompt, 8, greedy=True)
    b = model.generate(prompt, 8, greedy=True)
    assert a.shape == (2, 13) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    s1 = model.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    s2 = model.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    long = model.generate(prompt, 40, greedy=True, knowledge_off=True)  # past max_seq_len: context is cropped
    assert long.shape == (2, 45)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0.0)


def test_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = PureReasonerLM(_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx_BS = torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(60):
        out = model(idx_BS[:, :-1], idx_BS[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_controllers(out.stats)
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize(
    "idx,match",
    [
        (torch.zeros(2, 3, 4, dtype=torch.int64), "2-D integer"),
        (torch.zeros(2, 3), "2-D integer"),
        (torch.zeros(1, 33, dtype=torch.int64), "exceeds model.max_seq_len=32"),
    ],
)
def test_bad_input(idx, match):
    with pytest.raises(ValueError, match=match):
        PureReasonerLM(_cfg())(idx)

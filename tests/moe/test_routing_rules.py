"""The routing rule, from the outside: a hand-written per-mechanism specification on small cases, and causality
(a token's routing, hence every output at or before it, depends on that token and the router's state only)."""

import math

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, MoEConfig, PureReasonerLM, PureReasonerMoE, preset
from pure_reasoner.moe.router import KnowledgeRouter

MECHANISMS = ["gate", "null", "always"]


def _spec(mechanism: str, logits: list[float], bias: list[float], cut: float, top_k: int,
          consult_logit: float | None = None) -> list[tuple[int, float]]:
    """The documented rule for one token, in plain Python: [(expert, gate)] for its consulted slots.

    always: the top-k of logit + bias among the E real experts, gates = softmax over the real logits,
        renormalised over the chosen k.
    gate: the same, but only if the consult logit exceeds the cut, and every gate scaled by sigmoid(consult logit).
    null: top-k over E real candidates (logit + bias) and N nulls (logit + cut); gates = softmax over all E + N
        logits, renormalised over the chosen k (nulls included); null slots consult nothing.
    """
    num_experts = len(bias)
    scores = [logits[e] + bias[e] for e in range(num_experts)]
    if mechanism == "null":
        scores += [logits[e] + cut for e in range(num_experts, len(logits))]
        probs_of = logits
    else:
        probs_of = logits[:num_experts]
    chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[:top_k]
    total = sum(math.exp(v) for v in probs_of)
    probs = [math.exp(probs_of[e]) / total for e in chosen]
    gates = [p / sum(probs) for p in probs]
    if mechanism == "gate":
        if not consult_logit > cut:
            return []
        gates = [g / (1.0 + math.exp(-consult_logit)) for g in gates]
    return [(e, g) for e, g in zip(chosen, gates, strict=True) if e < num_experts]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_router_follows_the_written_rule(mechanism):
    torch.manual_seed(0)
    cfg = KnowledgeConfig(num_experts=5, expert_width=4, top_k=2, mechanism=mechanism, num_null_experts=3,
                          consult_rate=1.0 if mechanism == "always" else 0.4)
    router = KnowledgeRouter(6, cfg)
    cut = 1.5 if mechanism == "null" else 0.2  # nulls raised enough that some tokens consult nothing
    with torch.no_grad():
        router.proj.weight.normal_()
        router.expert_bias_E.copy_(torch.tensor([0.5, -0.3, 0.0, 0.8, -1.0]))
        router.margin_threshold.fill_(cut)
        if router.consult_proj is not None:
            router.consult_proj.weight.normal_()
            router.consult_proj.bias.fill_(-0.1)
    x_TD = torch.randn(40, 6, dtype=torch.float64)
    routing = router(x_TD)
    consulted = 0
    for t in range(40):
        logits = [sum(float(x_TD[t, d]) * float(router.proj.weight.detach()[e, d]) for d in range(6))
                  for e in range(cfg.num_router_outputs)]
        consult_logit = None
        if router.consult_proj is not None:
            consult_logit = float(router.consult_proj.bias.detach()) + sum(
                float(x_TD[t, d]) * float(router.consult_proj.weight.detach()[0, d]) for d in range(6))
        expected = _spec(mechanism, logits, router.expert_bias_E.tolist(), cut, 2, consult_logit)
        got = [(int(e), float(g)) for e, g in zip(routing.expert_ids_TK[t], routing.gates_TK[t], strict=True) if e >= 0]
        assert [e for e, _ in got] == [e for e, _ in expected], (t, got, expected)
        for (_, g), (_, g_ref) in zip(got, expected, strict=True):
            assert g == pytest.approx(g_ref, rel=1e-5, abs=1e-6), (t, got, expected)
        idle = [float(g) for e, g in zip(routing.expert_ids_TK[t], routing.gates_TK[t], strict=True) if e < 0]
        assert idle == [0.0] * len(idle)
        consulted += bool(expected)
    if mechanism != "always":
        assert 0 < consulted < 40  # the cases cover both decisions


def _moe(mechanism: str) -> PureReasonerMoE:
    kcfg = KnowledgeConfig(num_experts=6, expert_width=16, top_k=2, mechanism=mechanism, num_null_experts=6,
                           consult_rate=1.0 if mechanism == "always" else 0.3)
    layer = PureReasonerMoE(MoEConfig(d_model=16, reasoning_width=16, knowledge=kcfg))
    layer.init_weights(std=0.3, out_std=0.3)  # large enough that every term is visible
    return layer


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_causal_layer(mechanism, training):
    """Changing some tokens changes no other token's output: later positions of the same sequence, and other
    sequences of the batch, leave position t alone."""
    torch.manual_seed(1)
    layer = _moe(mechanism).train(training)
    x_BSD = torch.randn(3, 12, 16)
    changed_BSD = x_BSD.clone()
    changed_BSD[0, 8:] = 5.0 * torch.randn(4, 16)  # the end of sequence 0
    changed_BSD[2] = 5.0 * torch.randn(12, 16)  # all of sequence 2
    y_BSD, stats = layer(x_BSD)
    y2_BSD, stats2 = layer(changed_BSD)
    assert 0 < float(stats.consult_rate) and (mechanism == "always" or float(stats.consult_rate) < 1)
    torch.testing.assert_close(y2_BSD[0, :8], y_BSD[0, :8], rtol=0, atol=1e-6)
    torch.testing.assert_close(y2_BSD[1], y_BSD[1], rtol=0, atol=1e-6)
    assert not torch.allclose(y2_BSD[0, 8:], y_BSD[0, 8:])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_causal_model(mechanism, training):
    """The LM: logits at positions <= t do not depend on tokens after t, nor on other sequences of the batch."""
    torch.manual_seed(2)
    cfg = preset("tiny")
    cfg.knowledge.mechanism = mechanism
    cfg.knowledge.consult_rate = 1.0 if mechanism == "always" else 0.3
    model = PureReasonerLM(cfg).train(training)
    idx_BS = torch.randint(0, cfg.vocab_size, (3, 12))
    changed_BS = idx_BS.clone()
    changed_BS[0, 8:] = (idx_BS[0, 8:] + 1 + torch.randint(0, cfg.vocab_size - 1, (4,))) % cfg.vocab_size
    changed_BS[2] = torch.randint(0, cfg.vocab_size, (12,))
    out, out2 = model(idx_BS), model(changed_BS)
    torch.testing.assert_close(out2.logits_BSV[0, :8], out.logits_BSV[0, :8], rtol=0, atol=1e-6)
    torch.testing.assert_close(out2.logits_BSV[1], out.logits_BSV[1], rtol=0, atol=1e-6)
    assert not torch.allclose(out2.logits_BSV[0, 8:], out.logits_BSV[0, 8:])

"""The recorder captures exactly the routing the knowledge experts used, attributes it to the right
tokens, and leaves no trace on the model outside its ``with`` block."""

import pytest
import torch

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.moe import PureReasonerLM, preset
from pure_reasoner.moe.trace import record_knowledge_trace


def _model(mechanism: str = "gate", n_layers: int = 3) -> PureReasonerLM:
    cfg = preset("tiny")
    cfg.n_layers = n_layers
    cfg.knowledge.mechanism = mechanism
    if mechanism == "always":
        cfg.knowledge.consult_rate = 1.0
    if mechanism == "null":  # nulls win about half the slots at init, so some tokens consult and some don't
        cfg.knowledge.num_null_experts = cfg.knowledge.num_experts
    return PureReasonerLM(cfg).eval()


def _hook_counts(model: PureReasonerLM) -> int:
    modules = [model, *(layer.router for layer in model.moe_layers())]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


@pytest.mark.parametrize("mechanism", ["gate", "null", "always"])
def test_records_what_the_experts_received(mechanism):
    """The recorded ids and gates are exactly the ones each layer's experts were called with."""
    model = _model(mechanism)
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 11))  # B=2, odd S: a wrong [B, S] view shows
    seen = []  # (ids_TK, gates_TK) the experts got, in layer order: the test's own, independent hook
    handles = [
        layer.experts.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), args[2].clone())))
        for layer in model.moe_layers()
    ]
    with torch.no_grad(), record_knowledge_trace(model) as trace:
        out = model(idx_BS)
    for h in handles:
        h.remove()
    (trace_pass,) = trace.passes
    num_layers, top_k = len(model.moe_layers()), model.cfg.knowledge.top_k
    assert trace.moe_blocks == list(range(num_layers)) and trace.top_k == top_k
    assert trace_pass.expert_ids_LBSK.shape == (num_layers, 2, 11, top_k)
    torch.testing.assert_close(trace_pass.token_ids_BS, idx_BS, rtol=0, atol=0)
    for layer, (ids_TK, gates_TK) in enumerate(seen):
        torch.testing.assert_close(trace_pass.expert_ids_LBSK[layer].reshape(-1, top_k), ids_TK, rtol=0, atol=0)
        torch.testing.assert_close(trace_pass.gates_LBSK[layer].reshape(-1, top_k), gates_TK, rtol=0, atol=0)
        consulted = int(trace_pass.consulted_LBS[layer].sum())
        assert consulted == int(out.stats[layer].consulting_tokens)
    consulted_all = int(trace_pass.consulted_LBS.sum())
    if mechanism == "always":
        assert consulted_all == num_layers * 2 * 11
    else:  # a meaningful test: some tokens consult, some do not
        assert 0 < consulted_all < num_layers * 2 * 11


def test_tokens_are_attributed_to_their_batch_row():
    """Each row of a batch carries the routing that row gets when run alone (routing is per token
    and attention is causal, so batching must not change it)."""
    model = _model()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (3, 13))
    with torch.no_grad(), record_knowledge_trace(model) as trace:
        model(idx_BS)
        for b in range(3):
            model(idx_BS[b : b + 1])
    batched = trace.passes[0]
    for b, alone in enumerate(trace.passes[1:]):
        torch.testing.assert_close(batched.expert_ids_LBSK[:, b], alone.expert_ids_LBSK[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(batched.gates_LBSK[:, b], alone.gates_LBSK[:, 0])
    assert not torch.equal(batched.expert_ids_LBSK[:, 0], batched.expert_ids_LBSK[:, 1])  # rows do differ


def test_zero_cost_outside_the_block_and_results_unchanged():
    model = _model()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 9))
    assert _hook_counts(model) == 0
    with torch.no_grad():
        plain = model(idx_BS).logits_BSV
        with record_knowledge_trace(model) as trace:
            assert _hook_counts(model) == 2 + len(model.moe_layers())
            traced = model(idx_BS).logits_BSV
    assert _hook_counts(model) == 0
    torch.testing.assert_close(traced, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), record_knowledge_trace(model):
        raise RuntimeError("boom")
    assert _hook_counts(model) == 0  # removed on error too
    with torch.no_grad():
        model(idx_BS)
    assert len(trace.passes) == 1  # nothing recorded after the block closed


def test_knowledge_off_and_generate():
    model = _model()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (1, 5))
    with record_knowledge_trace(model) as trace:
        with torch.no_grad():
            model(idx_BS, knowledge_off=True)
        model.generate(idx_BS, max_new_tokens=3, greedy=True)
    off, *steps = trace.passes
    assert bool((off.expert_ids_LBSK == NOT_CONSULTED).all()) and not bool(off.gates_LBSK.any())
    assert [p.token_ids_BS.shape[1] for p in steps] == [5, 6, 7]  # one pass per generated token
    torch.testing.assert_close(steps[1].token_ids_BS[:, :5], idx_BS, rtol=0, atol=0)


def test_layer_called_alone_is_not_recorded_and_dense_model_refused():
    model = _model()
    layer = model.moe_layers()[0]
    with record_knowledge_trace(model) as trace:
        layer(torch.randn(4, model.cfg.d_model))
    assert trace.passes == []
    cfg = preset("tiny")
    cfg.dense_first_layers, cfg.dense_width = cfg.n_layers, 64
    with pytest.raises(ValueError, match="no MoE layers"), record_knowledge_trace(PureReasonerLM(cfg)):
        pass

"""moe.interventions: the constant-mean and batch-mean ablations, reasoning off, gradient routing and the mean
recorder against hand computation (the knowledge MLP's loop oracle, the reasoning expert from its weights), their
masks, composition with each other and with moe.trace, and the model restored when a block ends."""

from contextlib import ExitStack, nullcontext

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
from pure_reasoner.moe import KnowledgeConfig, MoEConfig, PureReasonerLM, PureReasonerMoE, preset
from pure_reasoner.moe.interventions import (
    gradient_routing,
    knowledge_mean,
    mean_ablation,
    reasoning_off,
    record_knowledge_means,
)
from pure_reasoner.moe.trace import record_knowledge_trace

FP32 = dict(rtol=1e-5, atol=1e-5)


def _layer(mechanism: str) -> PureReasonerMoE:
    kcfg = KnowledgeConfig(num_experts=5, expert_width=24, top_k=2, mechanism=mechanism, num_null_experts=5,
                           consult_rate=1.0 if mechanism == "always" else 0.5)
    layer = PureReasonerMoE(MoEConfig(d_model=16, reasoning_width=20, knowledge=kcfg)).eval()
    layer.init_weights(std=0.3, out_std=0.3)
    return layer


def _by_hand(layer: PureReasonerMoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reasoning_TD from the expert's weights, knowledge_TD from the loop oracle, consulted_T)."""
    r = layer.reasoning
    reasoning_TD = (F.silu(x_TD @ r.w1.weight.T) * (x_TD @ r.w3.weight.T)) @ r.w2.weight.T
    routing = layer.router(x_TD)
    e = layer.experts
    knowledge_TD = knowledge_mlp_reference(x_TD, routing.expert_ids_TK, routing.gates_TK, e.w1_EDF, e.w3_EDF, e.w2_EFD)
    return reasoning_TD, knowledge_TD, (routing.expert_ids_TK != NOT_CONSULTED).any(1)


@pytest.mark.parametrize("mechanism", ["gate", "null", "always"])
@pytest.mark.parametrize("masked", [False, True])
def test_constant_mean_ablation_equals_hand_computation(mechanism, masked):
    """y = reasoning(x) + (c where the token consulted [and is masked], else its own knowledge output)."""
    layer = _layer(mechanism)
    x_BSD = torch.randn(3, 9, 16)  # odd S: a wrong flattening of the mask shows
    mask_BS = (torch.arange(27) % 3 == 1).view(3, 9) if masked else None
    mean_1D = torch.randn(1, 16)
    reasoning_TD, knowledge_TD, consulted_T = _by_hand(layer, x_BSD.view(-1, 16))
    replaced_T = consulted_T & mask_BS.reshape(-1) if masked else consulted_T
    assert 0 < int(replaced_T.sum()) < 27 or (mechanism == "always" and not masked)
    expected_TD = reasoning_TD + torch.where(replaced_T.unsqueeze(1), mean_1D[0], knowledge_TD)
    with torch.no_grad(), mean_ablation(layer, mean_1D, mask_BS):
        y_BSD, _ = layer(x_BSD)
    torch.testing.assert_close(y_BSD.view(-1, 16), expected_TD, **FP32)
    with torch.no_grad():  # the hooks are gone after the block
        torch.testing.assert_close(layer(x_BSD)[0].view(-1, 16), reasoning_TD + knowledge_TD, **FP32)


def test_recorded_mean_is_over_every_recorded_token_of_every_call():
    """Two calls of different sizes: the mean pools their tokens (not the mean of the two calls' means); the
    mask selects per call."""
    layer = _layer("gate")
    x1_TD, x2_TD = torch.randn(30, 16), torch.randn(7, 16)
    mask1_T, mask2_T = torch.arange(30) % 2 == 0, torch.ones(7, dtype=torch.bool)
    rows = []
    for x_TD, mask_T in ((x1_TD, mask1_T), (x2_TD, mask2_T)):
        _, knowledge_TD, consulted_T = _by_hand(layer, x_TD)
        rows += [knowledge_TD[t] for t in range(len(x_TD)) if consulted_T[t] and mask_T[t]]
    expected_1D = torch.stack(rows).mean(0, keepdim=True)
    with torch.no_grad(), record_knowledge_means(layer, mask1_T) as record:
        layer(x1_TD)
        record.mask_BS = mask2_T
        layer(x2_TD)
    assert int(record.counts_L[0]) == len(rows)
    torch.testing.assert_close(record.means_LD(), expected_1D, **FP32)


def test_replaced_tokens_send_no_gradient_to_the_experts():
    layer = _layer("always")
    x_TD = torch.randn(12, 16)
    mask_T = torch.zeros(12, dtype=torch.bool)
    mask_T[:5] = True
    with mean_ablation(layer, torch.randn(1, 16)):  # every token replaced
        layer(x_TD)[0].square().sum().backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in layer.experts.parameters())
    assert all(float(p.grad.abs().max()) > 0.0 for p in layer.reasoning.parameters())
    layer.zero_grad()
    with mean_ablation(layer, torch.randn(1, 16), mask_T):  # tokens 5.. keep their own output, and its gradient
        layer(x_TD)[0].square().sum().backward()
    reference = _layer("always")
    reference.load_state_dict(layer.state_dict())
    reference(x_TD[5:])[0].square().sum().backward()
    torch.testing.assert_close(layer.experts.w1_EDF.grad, reference.experts.w1_EDF.grad, **FP32)


def _lm() -> PureReasonerLM:
    cfg = preset("tiny")
    cfg.n_layers = 3
    model = PureReasonerLM(cfg).eval()
    for layer in model.moe_layers():
        layer.init_weights(std=0.3, out_std=0.3)
    return model


@pytest.mark.parametrize("trace_first", [True, False])
def test_mean_ablation_composes_with_the_trace(trace_first):
    """Under both, in either order: the logits are the ablation's alone; the trace records the routing the
    experts used, and exactly the tokens it marks as consulting got the layer's constant (others: zero)."""
    model = _lm()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 13))
    with torch.no_grad(), record_knowledge_means(model) as record:
        model(torch.randint(0, model.cfg.vocab_size, (4, 20)))
    means_LD = record.means_LD()
    with torch.no_grad(), mean_ablation(model, means_LD):
        ablated_BSV = model(idx_BS).logits_BSV
    outputs = []  # each layer's knowledge output after the ablation's hook (registered after it: runs after it)
    with torch.no_grad():
        if trace_first:
            with record_knowledge_trace(model) as trace, mean_ablation(model, means_LD):
                handles = [layer.experts.register_forward_hook(lambda m, a, out: outputs.append(out))
                           for layer in model.moe_layers()]
                logits_BSV = model(idx_BS).logits_BSV
        else:
            with mean_ablation(model, means_LD), record_knowledge_trace(model) as trace:
                handles = [layer.experts.register_forward_hook(lambda m, a, out: outputs.append(out))
                           for layer in model.moe_layers()]
                logits_BSV = model(idx_BS).logits_BSV
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits_BSV, ablated_BSV, rtol=0, atol=0)
    (trace_pass,) = trace.passes
    consulted_LT = trace_pass.consulted_LBS.flatten(1)
    assert 0 < int(consulted_LT.sum()) < consulted_LT.numel()
    for layer, knowledge_TD in enumerate(outputs):
        expected_TD = torch.where(consulted_LT[layer].unsqueeze(1), means_LD[layer], 0.0)
        torch.testing.assert_close(knowledge_TD, expected_TD, rtol=0, atol=0)
    with torch.no_grad():  # the first layer's routing does not depend on the ablation
        with record_knowledge_trace(model) as plain:
            model(idx_BS)
    torch.testing.assert_close(plain.passes[0].expert_ids_LBSK[0], trace_pass.expert_ids_LBSK[0], rtol=0, atol=0)


def test_a_row_under_the_ablation_does_not_depend_on_its_batch():
    """The point of a constant: a sequence's logits are the same alone and beside others (batch-mean: they
    are not)."""
    model = _lm()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (5, 17))
    means_LD = torch.randn(len(model.moe_layers()), model.cfg.d_model)
    with torch.no_grad(), mean_ablation(model, means_LD):
        together_BSV = model(idx_BS).logits_BSV
        alone_SV = model(idx_BS[2:3]).logits_BSV[0]
    torch.testing.assert_close(together_BSV[2], alone_SV, **FP32)
    with torch.no_grad(), knowledge_mean(model):
        batch_mean_BSV = model(idx_BS).logits_BSV
        batch_mean_alone_SV = model(idx_BS[2:3]).logits_BSV[0]
    assert float((batch_mean_BSV[2] - batch_mean_alone_SV).abs().max()) > 1e-3


def test_the_ablation_does_not_see_later_positions():
    """Changing tokens after position t leaves positions <= t unchanged under the constant (the batch mean
    leaks them)."""
    model = _lm()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 16))
    later_BS = idx_BS.clone()
    later_BS[:, 9:] = torch.randint(0, model.cfg.vocab_size, (2, 7))
    means_LD = torch.randn(len(model.moe_layers()), model.cfg.d_model)
    with torch.no_grad(), mean_ablation(model, means_LD):
        torch.testing.assert_close(model(later_BS).logits_BSV[:, :9], model(idx_BS).logits_BSV[:, :9], **FP32)
    with torch.no_grad(), knowledge_mean(model):
        changed_BSV = model(later_BS).logits_BSV
        leak = changed_BSV[:, :9] - model(idx_BS).logits_BSV[:, :9]
    assert float(leak.abs().max()) > 1e-3


def test_bad_arguments_are_named():
    model = _lm()  # 3 MoE layers, d_model 64
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with pytest.raises(ValueError, match=r"means_LD must be a float tensor of shape \(3, 64\).*\(2, 64\)"):
        with mean_ablation(model, torch.zeros(2, 64)):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with mean_ablation(model, torch.full((3, 64), float("nan"))):
            pass
    with pytest.raises(ValueError, match=r"mask_BS must be bool with one entry per token \(10\).*\(2, 4\)"):
        with mean_ablation(model, torch.zeros(3, 64), torch.ones(2, 4, dtype=torch.bool)):
            model(idx_BS)
    dense = preset("tiny")
    dense.dense_first_layers, dense.dense_width = dense.n_layers, 128
    with pytest.raises(ValueError, match="no PureReasonerMoE layers"):
        with record_knowledge_means(PureReasonerLM(dense)):
            pass
    with record_knowledge_means(model, torch.zeros(2, 5, dtype=torch.bool)) as record:
        model(idx_BS)
    with pytest.raises(ValueError, match=r"no consulting token was recorded in MoE layer\(s\) \[0, 1, 2\]"):
        record.means_LD()


def _gated_layer() -> PureReasonerMoE:
    kcfg = KnowledgeConfig(num_experts=5, expert_width=24, top_k=2, consult_rate=0.5)
    layer = PureReasonerMoE(MoEConfig(d_model=16, reasoning_width=20, reasoning_gate=True, knowledge=kcfg)).eval()
    layer.init_weights(std=0.3, out_std=0.3)
    return layer


@pytest.mark.parametrize("gated", [False, True])
def test_reasoning_off_leaves_the_knowledge_path_alone(gated):
    """y = the knowledge path's output alone (loop oracle); the reasoning expert and its gate get no gradient."""
    layer = _gated_layer() if gated else _layer("gate")
    x_TD = torch.randn(21, 16)
    _, knowledge_TD, consulted_T = _by_hand(layer, x_TD)
    assert 0 < int(consulted_T.sum()) < 21
    with reasoning_off(layer):
        y_TD, _ = layer(x_TD)
    torch.testing.assert_close(y_TD, knowledge_TD, **FP32)
    y_TD.square().sum().backward()
    silent = [*layer.reasoning.parameters(), *(layer.reasoning_gate.parameters() if gated else ())]
    assert all(p.grad is None or not p.grad.any() for p in silent)
    assert any(p.grad is not None and p.grad.any() for p in layer.experts.parameters())


def test_gradient_routing_detaches_the_gated_reasoning_term():
    """With a reasoning gate: forward unchanged; the reasoning expert and its gate learn from the unfrozen tokens
    only (oracle: their term on those tokens alone); the knowledge path and router learn as without routing."""
    torch.manual_seed(0)
    layer = _gated_layer().double()  # float64: the comparisons below sum in different orders
    x_BSD, g_BSD = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    frozen_BS = torch.rand(3, 7) < 0.5
    assert frozen_BS.any() and (~frozen_BS).any()

    def grads(routed: bool):
        layer.zero_grad()
        with gradient_routing(layer, frozen_BS) if routed else nullcontext():
            y_BSD, _ = layer(x_BSD)
        (y_BSD * g_BSD).sum().backward()
        return y_BSD.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    y_full, grads_full = grads(False)
    y_routed, grads_routed = grads(True)
    torch.testing.assert_close(y_routed, y_full, rtol=0, atol=0)
    layer.zero_grad()
    x_ND, g_ND = x_BSD[~frozen_BS], g_BSD[~frozen_BS]
    (torch.sigmoid(layer.reasoning_gate(x_ND)) * layer.reasoning(x_ND) * g_ND).sum().backward()
    for prefix in ("reasoning.", "reasoning_gate."):
        module = layer.get_submodule(prefix[:-1])
        for name, param in module.named_parameters():
            torch.testing.assert_close(grads_routed[prefix + name], param.grad, rtol=1e-10, atol=1e-12)
            assert not torch.allclose(grads_full[prefix + name], param.grad)
    for name in grads_full:
        if not name.startswith("reasoning"):
            torch.testing.assert_close(grads_routed[name], grads_full[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("trace_first", [True, False])
def test_batch_mean_and_reasoning_off_compose_with_the_trace(trace_first):
    """knowledge_mean, reasoning_off and the trace in one forward, in either order: the logits are those of the two
    interventions alone (bit for bit), and the trace holds the routing of that ablated forward (what independent
    router hooks saw), which differs from the plain forward's above the first layer."""
    model = _lm()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 13))
    mask_BS = torch.rand(2, 13) < 0.5
    with torch.no_grad(), knowledge_mean(model, mask_BS), reasoning_off(model):
        alone_BSV = model(idx_BS).logits_BSV
    seen = []  # the routing the routers returned in the ablated forward
    handles = [layer.router.register_forward_hook(lambda m, a, out: seen.append(out.expert_ids_TK))
               for layer in model.moe_layers()]
    with torch.no_grad(), ExitStack() as stack:
        blocks = [lambda: record_knowledge_trace(model), lambda: knowledge_mean(model, mask_BS),
                  lambda: reasoning_off(model)]
        entered = [stack.enter_context(make()) for make in (blocks if trace_first else blocks[::-1])]
        trace = entered[0] if trace_first else entered[-1]
        logits_BSV = model(idx_BS).logits_BSV
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits_BSV, alone_BSV, rtol=0, atol=0)
    (trace_pass,) = trace.passes
    for layer, ids_TK in enumerate(seen):
        torch.testing.assert_close(trace_pass.expert_ids_LBSK[layer].reshape(ids_TK.shape), ids_TK, rtol=0, atol=0)
    with torch.no_grad(), record_knowledge_trace(model) as plain:
        model(idx_BS)
    plain_ids = plain.passes[0].expert_ids_LBSK
    assert torch.equal(plain_ids[0], trace_pass.expert_ids_LBSK[0])  # the first layer's routing: same input
    assert not torch.equal(plain_ids[1:], trace_pass.expert_ids_LBSK[1:])  # above it: the ablated inputs


def _interventions(model: PureReasonerLM, idx_BS: torch.Tensor) -> dict:
    means_LD = torch.randn(len(model.moe_layers()), model.cfg.d_model)
    half_BS = torch.arange(idx_BS.numel()).view(idx_BS.shape) % 2 == 0
    return {"reasoning_off": lambda: reasoning_off(model), "knowledge_mean": lambda: knowledge_mean(model),
            "knowledge_mean_masked": lambda: knowledge_mean(model, half_BS),
            "mean_ablation": lambda: mean_ablation(model, means_LD, half_BS),
            "gradient_routing": lambda: gradient_routing(model, half_BS),
            "record_knowledge_means": lambda: record_knowledge_means(model)}


@pytest.mark.parametrize("name", ["reasoning_off", "knowledge_mean", "knowledge_mean_masked", "mean_ablation",
                                  "gradient_routing", "record_knowledge_means"])
def test_leaving_a_block_restores_the_exact_outputs_and_removes_every_hook(name):
    """After the block (left normally, or by an error) the model gives bit for bit what it gave before, and no
    module carries a hook; inside it the output changed (the mean ablations, reasoning off) or not (gradient
    routing and the recorder change no forward value)."""
    model = _lm()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 11))
    make = _interventions(model, idx_BS)[name]
    with torch.no_grad():
        before_BSV = model(idx_BS).logits_BSV
        with make():
            inside_BSV = model(idx_BS).logits_BSV
        after_BSV = model(idx_BS).logits_BSV
        with pytest.raises(RuntimeError, match="inside the block"), make():
            model(idx_BS)
            raise RuntimeError("inside the block")
        after_error_BSV = model(idx_BS).logits_BSV
    assert torch.equal(after_BSV, before_BSV) and torch.equal(after_error_BSV, before_BSV)
    assert torch.equal(inside_BSV, before_BSV) == (name in ("gradient_routing", "record_knowledge_means"))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_masks_belong_to_their_block():
    """Two models under knowledge_mean with different masks at once: each gives what it gives under its own block
    alone (a mask is held by its block's hooks, not by shared state)."""
    first, second = _lm(), _lm()
    idx_BS = torch.randint(0, first.cfg.vocab_size, (2, 11))
    mask1_BS, mask2_BS = torch.rand(2, 11) < 0.3, torch.rand(2, 11) < 0.7
    with torch.no_grad():
        with knowledge_mean(first, mask1_BS):
            first_alone_BSV = first(idx_BS).logits_BSV
        with knowledge_mean(second, mask2_BS):
            second_alone_BSV = second(idx_BS).logits_BSV
        with knowledge_mean(first, mask1_BS), knowledge_mean(second, mask2_BS):
            assert torch.equal(first(idx_BS).logits_BSV, first_alone_BSV)
            assert torch.equal(second(idx_BS).logits_BSV, second_alone_BSV)
    assert not torch.equal(first_alone_BSV, first(idx_BS).logits_BSV)


def test_knowledge_mean_equals_hand_computation_on_the_model_call():
    """On a model, the batch mean is taken per layer over the call's consulting (masked) tokens: layer 0's mean
    output from a hand computation on that layer's input."""
    model = _lm()
    idx_BS = torch.randint(0, model.cfg.vocab_size, (8, 32))
    mask_BS = torch.rand(8, 32) < 0.5
    layer = model.moe_layers()[0]
    inputs, outputs = [], []

    def seen(module, args, out):
        inputs.append(args[0])
        outputs.append(out[0])

    handle = layer.register_forward_hook(seen)
    with torch.no_grad(), knowledge_mean(model, mask_BS):
        model(idx_BS)
    handle.remove()
    x_TD = inputs[0].reshape(-1, model.cfg.d_model)
    with torch.no_grad():
        reasoning_TD = layer.reasoning(x_TD)
        _, knowledge_TD, consulted_T = _by_hand(layer, x_TD)
    replaced_T = consulted_T & mask_BS.reshape(-1)
    assert 0 < int(replaced_T.sum()) < int(consulted_T.sum())
    expected_TD = reasoning_TD + torch.where(replaced_T.unsqueeze(1), knowledge_TD[replaced_T].mean(0), knowledge_TD)
    torch.testing.assert_close(outputs[0].reshape(-1, model.cfg.d_model), expected_TD, **FP32)


@pytest.mark.parametrize("mechanism", ["gate", "always"])
def test_knowledge_mean_with_gradient_trains_the_experts_mean(mechanism):
    """detach=False: the replaced tokens get the mean of their knowledge outputs with its gradient, the others
    their own output. Oracle: the layer's output from the loop reference on the same weights, differentiated."""
    torch.manual_seed(0)
    layer = _layer(mechanism)
    x_TD = torch.randn(14, 16)
    mask_T = torch.rand(14) < 0.6
    weight_TD = torch.randn(14, 16)
    with knowledge_mean(layer, mask_T, detach=False):
        (layer(x_TD)[0] * weight_TD).sum().backward()
    got = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    reasoning_TD, knowledge_TD, consulted_T = _by_hand(layer, x_TD)
    replaced_T = consulted_T & mask_T
    assert 0 < int(replaced_T.sum()) < len(x_TD)  # both branches: replaced tokens and tokens keeping their own
    y_TD = reasoning_TD + torch.where(replaced_T.unsqueeze(1), knowledge_TD[replaced_T].mean(0), knowledge_TD)
    (y_TD * weight_TD).sum().backward()
    want = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and any(name.startswith("experts.") for name in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32, msg=name)
    layer.zero_grad(set_to_none=True)
    with knowledge_mean(layer, torch.ones(14, dtype=torch.bool)):  # detached (the default): the experts learn nothing
        (layer(x_TD)[0] * weight_TD).sum().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in layer.experts.parameters())

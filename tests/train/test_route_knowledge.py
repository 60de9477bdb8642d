"""Knowledge gradient routing (objective.route_knowledge): which tokens are closed-book, and that their gradient
never reaches a reasoning expert while the forward pass is unchanged."""

from contextlib import nullcontext

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, MoEConfig, PureReasonerLM, PureReasonerMoE, gradient_routing
from pure_reasoner.train import data
from pure_reasoner.train.build_model import build_model
from pure_reasoner.train.loop import prepare_data
from pure_reasoner.train.world.generator import pretraining_corpus
from tests.train.helpers import compose_config, metrics, run_in_process


def test_closed_book_tokens_hand_made():
    eod = 0
    # units: plain "5 6 EOD" | context row "7 8 | 9 EOD" (7, 8 supplied) | padding "0 0" | plain "3 EOD"
    stream = torch.tensor([5, 6, 0, 7, 8, 9, 0, 0, 0, 3, 0])
    mask = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]).bool()
    closed = data.closed_book_tokens(stream, mask, eod)
    assert closed.tolist() == [True, True, True, False, False, False, False, False, False, True, True]


def test_closed_book_tokens_on_a_world_stream():
    docs = pretraining_corpus(preset="tiny", in_context_fraction=0.5, num_drills=4)
    merged = docs.map(lambda r: {"text": r["context"] + r["text"]}, remove_columns=docs.column_names)
    tok = data.train_tokenizer(merged, "bpe", 384)
    stream, mask = data.tokenize_in_context(docs, tok, 512)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    assert 0 < closed.float().mean() < 1
    assert not (closed & ~mask).any()  # a supplied (context) token is never closed-book
    # the closed tokens are exactly the rows without a context, in order
    plain = [r["text"] for r in docs if not r["context"]]
    assert tok.decode(stream[closed].tolist(), skip_special_tokens=False) == "".join(f"{t}{data.EOD}" for t in plain)


def _layer() -> PureReasonerMoE:
    kcfg = KnowledgeConfig(num_experts=6, expert_width=40, top_k=2, consult_rate=0.5)
    layer = PureReasonerMoE(MoEConfig(d_model=32, reasoning_width=48, knowledge=kcfg))
    layer.init_weights(std=0.3, out_std=0.3)
    return layer


def test_layer_frozen_tokens_send_no_gradient_to_the_reasoning_expert():
    torch.manual_seed(0)
    layer = _layer().double()  # float64: the comparisons below sum in different orders
    x_BSD, g_BSD = torch.randn(3, 9, 32, dtype=torch.float64), torch.randn(3, 9, 32, dtype=torch.float64)
    frozen_BS = torch.rand(3, 9) < 0.5
    assert frozen_BS.any() and (~frozen_BS).any()

    def run(frozen):
        layer.zero_grad()
        x = x_BSD.clone().requires_grad_()
        with gradient_routing(layer, frozen) if frozen is not None else nullcontext():
            y, _ = layer(x)
        (y * g_BSD).sum().backward()
        return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    y_full, gx_full, grads_full = run(None)
    y_frozen, gx_frozen, grads_frozen = run(frozen_BS)
    torch.testing.assert_close(y_frozen, y_full, rtol=0, atol=0)  # forward unchanged
    # the reasoning expert's gradient is what the unfrozen tokens alone give it
    layer.zero_grad()
    (layer.reasoning(x_BSD[~frozen_BS]) * g_BSD[~frozen_BS]).sum().backward()
    for name, param in layer.reasoning.named_parameters():
        torch.testing.assert_close(grads_frozen[f"reasoning.{name}"], param.grad, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(grads_full[f"reasoning.{name}"], param.grad)
    # knowledge experts and router: untouched by the routing
    for name in grads_full:
        if not name.startswith("reasoning."):
            torch.testing.assert_close(grads_frozen[name], grads_full[name], rtol=1e-10, atol=1e-12)
    # input gradient: unfrozen tokens unchanged; frozen tokens lose exactly the reasoning expert's part
    x = x_BSD.clone().requires_grad_()
    (gx_reasoning,) = torch.autograd.grad((layer.reasoning(x) * g_BSD).sum(), x)
    torch.testing.assert_close(gx_frozen[~frozen_BS], gx_full[~frozen_BS], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_frozen[frozen_BS] + gx_reasoning[frozen_BS], gx_full[frozen_BS],
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="frozen_BS"), gradient_routing(layer, frozen_BS[:, :4]):
        layer(x_BSD)
    with pytest.raises(ValueError, match="frozen_BS"), gradient_routing(layer, frozen_BS.float()):
        layer(x_BSD)


def test_model_all_frozen_trains_no_reasoning_expert():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, reasoning_width=48,
                      knowledge=KnowledgeConfig(num_experts=4, expert_width=32, consult_rate=0.5))
    model = PureReasonerLM(cfg)
    idx_BS = torch.randint(0, 64, (2, 17))
    frozen_BS = torch.ones(2, 17, dtype=torch.bool)
    with gradient_routing(model, frozen_BS):
        out = model(idx_BS, idx_BS)
    out.loss.backward()
    torch.testing.assert_close(out.logits_BSV, model(idx_BS).logits_BSV, rtol=0, atol=0)
    for name, param in model.named_parameters():
        if ".reasoning." in name:
            assert param.grad is None or not param.grad.any(), name
        elif "experts" in name or "attn" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("route", [True, False])
def test_training_batch_routes_closed_book_gradient_away_from_reasoning(tmp_path, dist_info, route):
    """The loop's own micro-batch and forward: with ``objective.route_knowledge`` every closed-book token's
    gradient at every reasoning expert's output is exactly 0 (so none reaches its weights), and the other
    tokens' is not; without it, closed-book tokens train the reasoning experts too."""
    world = ("data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny", "data.seq_len=384",
             "model.max_seq_len=384", "data.max_chars=null", "train.micro_batch_size=2")
    cfg = compose_config(*world, f"objective.route_knowledge={str(route).lower()}")
    batch = prepare_data(cfg, tmp_path, dist_info)[0].micro_batch(cfg, dist_info, step=0, micro=0)
    # Which tokens are closed-book: the data's mask, from a routed config's packing of the same sequences.
    routed_data, _ = prepare_data(compose_config(*world, "objective.route_knowledge=true"), tmp_path, dist_info)
    positions = data.micro_batch_positions(0, 0, 0, 2, 1, 1)
    assert torch.equal(routed_data.packed.batch(positions)[0], batch["idx_BS"])
    closed_T = routed_data.packed.closed(positions).reshape(-1)
    trained_T = ~closed_T & (batch["targets_BS"].reshape(-1) != -100)  # other tokens with a loss
    assert closed_T.any() and trained_T.any()
    model = build_model(cfg)
    outputs = []
    for layer in model.moe_layers():
        layer.reasoning.register_forward_hook(lambda module, args, y_TD: outputs.append(y_TD) or y_TD.retain_grad())
    frozen_BS = batch.pop("reasoning_frozen_BS", None)  # the loop applies it as gradient routing
    assert (frozen_BS is not None) == route
    with gradient_routing(model, frozen_BS) if route else nullcontext():
        model(**batch).loss.backward()
    assert len(outputs) == cfg.model.n_layers
    for y_TD in outputs:
        closed_grad = y_TD.grad[closed_T].abs().amax()
        assert (closed_grad == 0) if route else (closed_grad > 0)
        assert (y_TD.grad[trained_T].abs().amax(1) > 0).all()


def test_route_knowledge_config_errors():
    with pytest.raises(ValueError, match="route_knowledge"):
        compose_config("objective.route_knowledge=true")  # no in-context data
    world = ("data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny")
    with pytest.raises(ValueError, match="route_knowledge"):
        compose_config(*world, "objective.route_knowledge=true", "model=tiny_dense")
    with pytest.raises(ValueError, match="route_knowledge"):
        compose_config(*world, "objective.route_knowledge=true", "model=tiny_topk_moe")
    with pytest.raises(ValueError, match="closed"):
        data.PackedSequences(torch.arange(100), 10, 0).closed(torch.arange(2))
    with pytest.raises(ValueError, match="consult_loss_coef"):
        compose_config("model.knowledge.consult_loss_coef=0.1")  # no in-context data


def test_routed_run_end_to_end(tmp_path):
    run_in_process(
        tmp_path / "run", "data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny",
        "data.seq_len=384", "model.max_seq_len=384", "data.max_chars=null", "objective.route_knowledge=true",
        "data.fresh_drills=1",
    )
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]

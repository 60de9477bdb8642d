"""Knowledge-off forgetting (objective.forget_weight / read_weight): the masks a micro-batch carries, the
parameters the knowledge-off pass trains, config errors and a run end to end."""

import math
from contextlib import nullcontext

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM, flops, knowledge_mean
from pure_reasoner.train import data
from pure_reasoner.train.config import ObjectiveConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import TrainData
from pure_reasoner.train.objectives import forget_pass, forget_pass_flops, knowledge_off_loss
from pure_reasoner.train.world.drills import FreshDrills
from pure_reasoner.train.world.generator import build_world, corpus_world_config
from tests.moe.flop_count import SEQ, counted, exact_rate, small_model
from tests.train.helpers import SMALL_RUN, compose_config, metrics, run_in_process

FORGET = ("experiment=decoupling_tiny", "name=t", "objective.forget_weight=1.0", "objective.read_weight=0.5")


def _micro_batch(*overrides: str):
    """A micro-batch of a decoupling_tiny run with 2 fresh drills; with its packed corpus, positions, corpus rows."""
    cfg = compose_config(*FORGET, "data.fresh_drills=2", *overrides)
    docs = data.load_documents(cfg.data, recall=cfg.uses_recall_tokens)
    tok = data.train_tokenizer(docs, "bpe", cfg.model.vocab_size)
    stream, mask = data.tokenize_in_context(docs, tok, cfg.data.seq_len)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    recall = data.recall_tokens(docs, tok, cfg.data.seq_len) & closed
    packed = data.PackedSequences(stream, cfg.data.seq_len, 0, loss_mask=mask, closed=closed, recall=recall)
    drills = FreshDrills(build_world(corpus_world_config(**cfg.data.generator_kwargs)), tok, cfg.data.seq_len)
    batch = TrainData(packed, drills).micro_batch(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), step=2, micro=0)
    positions = data.micro_batch_positions(2, 0, 0, cfg.train.micro_batch_size - 2, 1, 1)
    return batch, packed, positions, cfg.train.micro_batch_size - 2


def test_micro_batch_masks_forget_recall_tokens_and_read_everything_else():
    batch, packed, positions, corpus = _micro_batch()
    assert "consult_target_BS" not in batch and "reasoning_frozen_BS" not in batch  # nothing else switched on
    assert torch.equal(batch["forget_BS"][:corpus], packed.recall(positions))
    assert torch.equal(batch["read_BS"][:corpus], ~packed.closed(positions))
    assert batch["forget_BS"].any() and not (batch["forget_BS"] & batch["read_BS"]).any()
    assert batch["read_BS"][corpus:].all() and not batch["forget_BS"][corpus:].any()  # drills: read, never forget


def test_read_rows_drills_reads_the_drill_sequences_only():
    batch, packed, positions, corpus = _micro_batch("objective.read_rows=drills")
    assert torch.equal(batch["forget_BS"][:corpus], packed.recall(positions))  # forgetting unchanged
    assert (~packed.closed(positions)).any()  # context rows the default would read
    assert not batch["read_BS"][:corpus].any() and batch["read_BS"][corpus:].all()
    with pytest.raises(ValueError, match="read_rows='drills' scores the fresh drills only.*fresh_drills > 0, got 0"):
        compose_config(*FORGET, "objective.read_rows=drills")
    with pytest.raises(ValueError, match="read_rows='drills'.*forget_weight or read_weight > 0"):
        ObjectiveConfig(read_rows="drills")
    with pytest.raises(ValueError, match="read_rows must be one of"):
        ObjectiveConfig(forget_weight=1.0, read_rows="context")


@pytest.mark.parametrize("ablation", ["knowledge_off", "recall_mean"])
def test_the_knowledge_off_pass_trains_the_always_on_path_only(ablation):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, reasoning_width=48,
                      knowledge=KnowledgeConfig(num_experts=4, expert_width=24, top_k=2))
    torch.manual_seed(0)
    model = PureReasonerLM(cfg)
    idx_BS, targets_BS = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    forget_BS = torch.rand(3, 16) < 0.3
    off = ablation == "knowledge_off"
    with nullcontext() if off else knowledge_mean(model, forget_BS):
        logits_BSV = model(idx_BS, knowledge_off=off).logits_BSV
    loss, _ = knowledge_off_loss(logits_BSV, targets_BS, forget_BS, ~forget_BS, 1.0, 1.0)
    loss.backward()
    for layer in model.moe_layers():
        assert all(p.grad is None for p in layer.experts.parameters())
        assert all(p.grad is None for p in layer.router.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.reasoning.parameters())
    assert model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ablation,mean_grad", [("knowledge_off", False), ("recall_mean", False), ("both", False),
                                                ("recall_mean", True), ("both", True)])
def test_forget_pass_flops_are_what_the_pass_costs(ablation, mean_grad, monkeypatch):
    """What the loop logs for the forget pass against PyTorch's FLOP counter on the pass the loop runs (with
    objective.mean_grad the mean pass's experts run backward too)."""
    model = small_model("gate")
    exact_rate(model, monkeypatch)  # the ordinary pass and the forget pass route the same number of rows
    idx_BS, targets_BS = torch.randint(0, 40, (2, SEQ)), torch.randint(0, 40, (2, SEQ))
    forget_BS = torch.rand(2, SEQ) < 0.3
    objective = ObjectiveConfig(forget_weight=1.0, read_weight=0.5, forget_ablation=ablation, mean_grad=mean_grad)
    counts = counted(lambda: forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS, objective).backward())
    stats = model(idx_BS).stats  # the ordinary pass's routing, as the loop passes it
    logged = forget_pass_flops(model.cfg, objective, SEQ, stats)
    assert sum(counts.values()) / idx_BS.numel() == pytest.approx(logged, rel=0.01)


@pytest.mark.parametrize("mean_read", [0.0, 0.4], ids=["unread", "mean_read_weight"])
def test_both_passes_add_the_knowledge_off_pass_and_a_recall_mean_pass(mean_read):
    """The oracle: the two ablations run by hand (knowledge_off; moe.knowledge_mean at the forget tokens) and scored
    by knowledge_off_loss, the second with ``objective.mean_read_weight`` as its read weight (0 by default)."""
    torch.manual_seed(0)
    model = small_model("gate").eval()
    idx_BS, targets_BS = torch.randint(0, 40, (2, SEQ)), torch.randint(0, 40, (2, SEQ))
    forget_BS = torch.rand(2, SEQ) < 0.3
    with torch.no_grad():
        got = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS,
                          ObjectiveConfig(forget_weight=0.7, read_weight=0.5, forget_ablation="both",
                                          mean_read_weight=mean_read))
        off, _ = knowledge_off_loss(model(idx_BS, knowledge_off=True).logits_BSV, targets_BS, forget_BS, ~forget_BS,
                                    0.7, 0.5)
        with knowledge_mean(model, forget_BS):
            mean, parts = knowledge_off_loss(model(idx_BS).logits_BSV, targets_BS, forget_BS, ~forget_BS, 0.7,
                                             mean_read)
    assert mean > 0 and parts["read"] > 0
    torch.testing.assert_close(got, off + mean)


def test_the_mean_pass_at_every_consulting_token():
    """objective.mean_tokens=consulting: the mean pass replaces every consulting token's knowledge output (the
    eval's knowledge_mean, moe.knowledge_mean without a mask), scored at the forget tokens as before."""
    torch.manual_seed(0)
    model = small_model("gate").eval()
    idx_BS, targets_BS = torch.randint(0, 40, (2, SEQ)), torch.randint(0, 40, (2, SEQ))
    forget_BS = torch.rand(2, SEQ) < 0.3
    objective = ObjectiveConfig(forget_weight=0.7, read_weight=0.5, forget_ablation="recall_mean",
                                mean_tokens="consulting")
    with torch.no_grad():
        got = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS, objective)
        with knowledge_mean(model):
            want, _ = knowledge_off_loss(model(idx_BS).logits_BSV, targets_BS, forget_BS, ~forget_BS, 0.7, 0.5)
        at_recall = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS,
                                ObjectiveConfig(forget_weight=0.7, read_weight=0.5, forget_ablation="recall_mean"))
    torch.testing.assert_close(got, want)
    assert abs(float(got - at_recall)) > 1e-4  # the other consulting tokens' outputs matter


def test_the_mean_pass_with_gradient_trains_the_experts_mean():
    """objective.mean_grad: the mean pass's loss equals the detached pass's (same forward), and its gradient reaches
    the experts and routers exactly as through moe.knowledge_mean(detach=False) run by hand; detached, it does not
    reach them."""
    torch.manual_seed(0)
    model = small_model("gate")
    idx_BS, targets_BS = torch.randint(0, 40, (2, SEQ)), torch.randint(0, 40, (2, SEQ))
    forget_BS = torch.rand(2, SEQ) < 0.3
    knowledge = [p for layer in model.moe_layers() for p in (*layer.experts.parameters(), *layer.router.parameters())]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad for p in knowledge]

    def objective(mean_grad):
        return ObjectiveConfig(forget_weight=0.7, read_weight=0.5, forget_ablation="recall_mean",
                               mean_tokens="consulting", mean_grad=mean_grad)

    trained = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS, objective(True))
    got = grads(trained)
    with knowledge_mean(model, detach=False):
        want, _ = knowledge_off_loss(model(idx_BS).logits_BSV, targets_BS, forget_BS, ~forget_BS, 0.7, 0.5)
    torch.testing.assert_close(trained, want)
    for g, w in zip(got, grads(want), strict=True):
        torch.testing.assert_close(g, w)
    assert all(g is not None for g in got) and any(float(g.abs().max()) > 0 for g in got)
    detached = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS, objective(False))
    torch.testing.assert_close(detached, trained)
    assert all(g is None or float(g.abs().max()) == 0 for g in grads(detached))


def test_the_mean_pass_against_the_knowledge_off_prediction():
    """mean_forget_target=knowledge_off: the mean pass's forget term is KL(p_mean || p_off) at the forget tokens,
    p_off the knowledge-off pass's prediction as a fixed target (no gradient through it). Oracle: the loss written
    out by hand from the two ablations, its value and every parameter's gradient."""
    torch.manual_seed(0)
    model = small_model("gate")
    idx_BS, targets_BS = torch.randint(0, 40, (2, SEQ)), torch.randint(0, 40, (2, SEQ))
    forget_BS = torch.rand(2, SEQ) < 0.3
    objective = ObjectiveConfig(forget_weight=0.7, read_weight=0.5, forget_ablation="both", mean_tokens="consulting",
                                mean_forget_target="knowledge_off", mean_forget_weight=2.0, mean_grad=True)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    got = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS, objective)
    got_grads = grads(got)
    log_off = model(idx_BS, knowledge_off=True).logits_BSV.log_softmax(-1)
    with knowledge_mean(model, detach=False):
        log_mean = model(idx_BS).logits_BSV.log_softmax(-1)
    off_N, mean_N, fixed_N = log_off[forget_BS], log_mean[forget_BS], log_off[forget_BS].detach()
    uniform = (off_N.exp() * (off_N + math.log(40))).sum(-1).mean()  # the knowledge-off pass: KL(p || uniform)
    matched = (mean_N.exp() * (mean_N - fixed_N)).sum(-1).mean()
    read = torch.nn.functional.nll_loss(log_off[~forget_BS], targets_BS[~forget_BS])
    want = 0.7 * uniform + 0.5 * read + 2.0 * matched
    assert float(matched) > 1e-3
    torch.testing.assert_close(got, want)
    want_grads = grads(want)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)


def test_knowledge_off_pass_config_errors():
    with pytest.raises(ValueError, match="mean_forget_target='knowledge_off' scores the mean pass against"):
        ObjectiveConfig(forget_weight=1.0, forget_ablation="recall_mean", mean_forget_target="knowledge_off")
    with pytest.raises(ValueError, match="mean_grad=true sends the recall_mean pass's gradient into the experts"):
        ObjectiveConfig(forget_weight=1.0, mean_grad=True)
    with pytest.raises(ValueError, match="forget_weight must be >= 0"):
        ObjectiveConfig(forget_weight=-1.0)
    with pytest.raises(ValueError, match="forget_ablation must be one of"):
        ObjectiveConfig(forget_ablation="everything")
    with pytest.raises(ValueError, match="mean_tokens must be one of"):
        ObjectiveConfig(forget_ablation="both", mean_tokens="names")
    with pytest.raises(ValueError, match="mean_tokens='consulting' chooses"):
        ObjectiveConfig(forget_weight=1.0, mean_tokens="consulting")
    with pytest.raises(ValueError, match="forget_weight / read_weight need objective.kind=lm"):
        ObjectiveConfig(kind="distill", teacher="x", read_weight=1.0)
    with pytest.raises(ValueError, match="forget_weight"):
        compose_config("objective.forget_weight=1.0")  # no in-context data
    with pytest.raises(ValueError, match="MoE layers"):
        compose_config(*FORGET, "model=tiny_dense")
    with pytest.raises(ValueError, match="forget_weight need data.generator"):
        compose_config("data.source=generator", "data.generator=tests.train.test_recall_targets:_rows_without_recall",
                       "data.in_context_fraction=0.5", "objective.forget_weight=1.0")


@pytest.mark.parametrize("ablation", ["knowledge_off", "recall_mean", "both"])
def test_forget_run_end_to_end(tmp_path, ablation):
    overrides = ("data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny",
                 "data.seq_len=384", "model.max_seq_len=384", "data.max_chars=null", "objective.forget_weight=1.0",
                 "objective.read_weight=0.5", "data.fresh_drills=1", f"objective.forget_ablation={ablation}")
    run_in_process(tmp_path / "run", *overrides)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]
    # At initialisation every prediction is near uniform: the forget term is ~0 and the read term is the plain
    # CE, so the pass's loss is read_weight (0.5) times it; then it is trained down.
    assert rows[0]["knowledge_off"] == pytest.approx(0.5 * rows[0]["ce"], rel=0.05)
    assert rows[-1]["knowledge_off"] < 0.95 * rows[0]["knowledge_off"]  # 12 steps: ~11% lower
    # Logged FLOPs count the forget pass. The routing is near its target (the rate within +-20% moves a step's
    # FLOPs by up to ~3% here); without the pass the figure would be half.
    cfg = compose_config(*SMALL_RUN, *overrides)
    expected = flops.nominal(cfg.model, 384).flops_per_token + forget_pass_flops(cfg.model, cfg.objective, 384)
    assert [row["flops_per_token"] for row in rows] == pytest.approx([expected] * len(rows), rel=0.05)



def test_mean_read_weight_config_errors():
    with pytest.raises(ValueError, match="mean_read_weight=0.4 is the read term of the second pass"):
        ObjectiveConfig(forget_weight=1.0, mean_read_weight=0.4)
    with pytest.raises(ValueError, match="mean_read_weight must be >= 0"):
        ObjectiveConfig(forget_weight=1.0, forget_ablation="both", mean_read_weight=-1.0)

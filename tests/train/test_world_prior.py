"""The world's prior over value tokens (objective.forget_target=world_prior): the tries against a brute-force count of
the value spaces, the stream's nodes against the text they sit in, the forget term against torch's own KL, the
micro-batch's nodes, config errors and a run end to end."""

from __future__ import annotations

import calendar
import itertools
import logging
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.train import data
from pure_reasoner.train.config import ObjectiveConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import TrainData
from pure_reasoner.train.objectives import forget_term, knowledge_off_loss
from pure_reasoner.train.world.generator import build_world, corpus_world_config
from pure_reasoner.train.world.prior import ValuePrior
from tests.train.helpers import compose_config, metrics, run_in_process

PRIOR = ("experiment=decoupling_tiny", "name=t", "objective.forget_weight=1.0", "objective.read_weight=0.5",
         "objective.forget_target=world_prior")


@pytest.fixture(scope="module")
def corpus():
    """A decoupling_tiny corpus: config, world, tokenizer, stream and its closed-book recall tokens."""
    cfg = compose_config(*PRIOR, "data.fresh_drills=2")
    docs = data.load_documents(cfg.data, recall=True)
    tok = data.train_tokenizer(docs, "bpe", cfg.model.vocab_size)
    stream, mask = data.tokenize_in_context(docs, tok, cfg.data.seq_len)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    recall = data.recall_tokens(docs, tok, cfg.data.seq_len) & closed
    world = build_world(corpus_world_config(**cfg.data.generator_kwargs))
    return cfg, world, tok, stream, mask, closed, recall


def _spaces(world) -> dict[str, list[str]]:
    """Each value space listed independently of the code under test (dates from the calendar's month names)."""
    years = range(world.cfg.first_year, world.cfg.first_year + world.cfg.num_years)
    dates = [f"{calendar.month_name[m]} {d}, {y}" for y, m, d in itertools.product(years, range(1, 13), range(1, 29))]
    countries = sorted(set(world.city_country.values()))
    return {"birth_date": dates, "birth_city": list(world.city_country), "university": list(world.universities),
            "major": list(world.majors), "employer": list(world.employer_city), "birth_country": countries}


def test_each_node_gives_the_share_of_the_values_that_continue_with_each_token(corpus):
    _, world, tok, *_ = corpus
    prior = ValuePrior.build(world, tok)
    for attribute, values in _spaces(world).items():
        after: dict[tuple[int, ...], Counter] = {}  # every prefix of every value -> the tokens that follow it
        for ids in (tok.encode(f" {v}").ids for v in values):
            for j in range(len(ids)):
                after.setdefault(tuple(ids[:j]), Counter())[ids[j]] += 1
        for prefix, counts in itertools.islice(after.items(), 0, None, max(1, len(after) // 400)):
            node = prior.roots[attribute]
            for token in prefix:
                node = prior.children[node][token]
            lo, hi = int(prior.node_ptr[node]), int(prior.node_ptr[node + 1])
            got = dict(zip(prior.entry_token[lo:hi].tolist(), prior.entry_logq[lo:hi].exp().tolist(), strict=True))
            total = sum(counts.values())
            assert got == pytest.approx({t: n / total for t, n in counts.items()}, rel=1e-5), (attribute, prefix)


def test_the_stream_nodes_walk_each_value_and_leave_names_alone(corpus):
    _, world, tok, stream, _, _, recall = corpus
    prior = ValuePrior.build(world, tok)
    nodes = prior.stream_nodes(stream, recall)
    assert not (nodes[~recall] >= 0).any()
    values = {v for space in _spaces(world).values() for v in space}
    names = {p.name for p in world.people}
    edge = torch.diff(recall.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    starts, stops = (edge == 1).nonzero().flatten().tolist(), (edge == -1).nonzero().flatten().tolist()
    kinds = Counter()
    for start, stop in zip(starts, stops, strict=True):
        text = tok.decode(stream[start:stop].tolist()).strip()
        if text in names:
            assert (nodes[start:stop] == -1).all(), text  # a comparison's answer: no value space spells it
            kinds["name"] += 1
            continue
        assert text in values, text
        assert (nodes[start:stop] >= 0).all(), text
        for i in range(start, stop):  # each token is one of its node's next tokens
            node = int(nodes[i])
            lo, hi = int(prior.node_ptr[node]), int(prior.node_ptr[node + 1])
            assert int(stream[i]) in prior.entry_token[lo:hi].tolist()
        kinds["value"] += 1
    assert kinds["value"] > 100 and kinds["name"] > 0


@pytest.mark.parametrize("reverse", [False, True])
def test_forget_term_is_kl_from_the_prior_where_known_and_from_uniform_elsewhere(corpus, reverse):
    _, world, tok, *_ = corpus
    prior = ValuePrior.build(world, tok)
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    logits_BSV = torch.randn(2, 6, V, requires_grad=True)
    forget_BS = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    nodes_BS = torch.randint(0, len(prior.children), (2, 6))
    nodes_BS[0, 3] = nodes_BS[1, 2] = -1  # no prior there: uniform
    while any(prior.node_ptr[n + 1] == prior.node_ptr[n] for n in nodes_BS[nodes_BS >= 0]):  # leaves predict nothing
        nodes_BS = torch.where(nodes_BS >= 0, torch.randint(0, len(prior.children), (2, 6)), nodes_BS)
    expected = []
    for b, s in forget_BS.nonzero().tolist():
        log_p = F.log_softmax(logits_BSV[b, s].double(), -1)
        node = int(nodes_BS[b, s])
        if node < 0:
            expected.append(F.kl_div(torch.full_like(log_p, -math.log(V)), log_p, log_target=True, reduction="sum"))
            continue
        q = torch.zeros(V, dtype=torch.float64)
        lo, hi = int(prior.node_ptr[node]), int(prior.node_ptr[node + 1])
        q[prior.entry_token[lo:hi]] = prior.entry_logq[lo:hi].double().exp()
        if reverse:  # KL(p || q smoothed with 1e-3 of the uniform)
            q_eps = (1 - 1e-3) * q + 1e-3 / V
            expected.append(F.kl_div(q_eps.log(), log_p, log_target=True, reduction="sum"))
        else:
            expected.append(F.kl_div(log_p, q, reduction="sum"))  # KL(q || p)
    got = forget_term(logits_BSV, forget_BS, nodes_BS, prior, reverse)
    assert float(got.detach()) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    got.backward()
    assert logits_BSV.grad[~forget_BS].abs().max() == 0 and logits_BSV.grad[forget_BS].abs().max() > 0
    # p equal to the prior at a known node: nothing to forget. knowledge_off_loss scores it as its forget term.
    node = int(prior.roots["major"])
    lo, hi = int(prior.node_ptr[node]), int(prior.node_ptr[node + 1])
    exact_V = torch.full((V,), -1e4)
    exact_V[prior.entry_token[lo:hi]] = prior.entry_logq[lo:hi]
    loss, parts = knowledge_off_loss(exact_V.expand(1, 1, V), torch.zeros(1, 1, dtype=torch.long),
                                     torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool), 1.0, 0.0,
                                     torch.tensor([[node]]), prior, reverse)
    # KL(q || p) is 0 up to the -1e4 logits' leak; KL(p || q_eps) is -log(1 - eps) ~ 1.0e-3 at p = q
    exact = -math.log1p(-1e-3) if reverse else 0.0
    assert float(parts["forget"]) == pytest.approx(exact, abs=1e-5) and float(loss) == float(parts["forget"])
    peaked_V = exact_V.clone()
    peaked_V[prior.entry_token[lo]] += 5.0  # sure of one value: something to forget
    assert float(forget_term(peaked_V.expand(1, 1, V), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[node]]),
                             prior, reverse)) > 0.5
    with pytest.raises(ValueError, match="a prior needs prior_node_BS of shape"):
        forget_term(logits_BSV, forget_BS, None, prior)
    with pytest.raises(ValueError, match="prior nodes must lie in"):
        prior.entries(torch.tensor([len(prior.children)]))


def test_micro_batch_carries_each_target_s_prior_node(corpus):
    cfg, world, tok, stream, mask, closed, recall = corpus
    from pure_reasoner.train.world.drills import FreshDrills

    prior = ValuePrior.build(world, tok)
    nodes = prior.stream_nodes(stream, recall)
    packed = data.PackedSequences(stream, cfg.data.seq_len, 0, loss_mask=mask, closed=closed, recall=recall,
                                  prior_nodes=nodes)
    drills = FreshDrills(world, tok, cfg.data.seq_len)
    batch = TrainData(packed, drills, prior=prior).micro_batch(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), 2, 0)
    corpus_rows = cfg.train.micro_batch_size - 2
    positions = data.micro_batch_positions(2, 0, 0, corpus_rows, 1, 1)
    node_BS = batch["prior_node_BS"]
    assert torch.equal(node_BS[:corpus_rows], packed.prior_nodes(positions)) and (node_BS[corpus_rows:] == -1).all()
    assert ((node_BS >= 0) <= batch["forget_BS"]).all() and (node_BS >= 0).any()  # only forget tokens have a node
    _, targets_BS = packed.batch(positions)
    for (b, s) in (node_BS[:corpus_rows] >= 0).nonzero().tolist():  # the target is a token the node can predict
        node = int(node_BS[b, s])
        lo, hi = int(prior.node_ptr[node]), int(prior.node_ptr[node + 1])
        assert int(targets_BS[b, s]) in prior.entry_token[lo:hi].tolist()
    assert "prior_node_BS" not in TrainData(packed, drills).micro_batch(
        cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), 2, 0)


def test_world_prior_config_errors():
    with pytest.raises(ValueError, match="forget_target must be one of"):
        ObjectiveConfig(forget_weight=1.0, forget_target="names")
    with pytest.raises(ValueError, match="forget_target='world_prior' shapes the forget term.*forget_weight > 0"):
        ObjectiveConfig(read_weight=1.0, forget_target="world_prior")
    with pytest.raises(ValueError, match="forget_target='world_prior_reverse' shapes the forget term"):
        ObjectiveConfig(read_weight=1.0, forget_target="world_prior_reverse")
    with pytest.raises(ValueError, match="'world_prior' / mean_forget_target=None build the prior.*data.generator"):
        compose_config("data=world_dir", "data.path=x", "objective.forget_weight=1.0",
                       "objective.forget_target=world_prior")


def test_world_prior_run_end_to_end(tmp_path, caplog):
    overrides = ("data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny",
                 "data.seq_len=384", "model.max_seq_len=384", "data.max_chars=null", "objective.forget_weight=1.0",
                 "objective.read_weight=0.5", "data.fresh_drills=1", "objective.forget_ablation=both",
                 "objective.forget_target=world_prior")
    with caplog.at_level(logging.INFO, logger="train"):
        run_in_process(tmp_path / "run", *overrides)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]
    covered = float(caplog.text.split("world prior: ")[1].split("covering ")[1].split("%")[0])
    assert 80 < covered < 100  # every value resolved; the comparisons' answered names are not


def _toy_prior() -> ValuePrior:
    """One space of two values over a 40-token vocabulary: token 3 then 5 (a quarter of the values) or token 7."""
    return ValuePrior(torch.tensor([0, 2, 3, 3, 3]), torch.tensor([3, 7, 5]), torch.tensor([0.25, 0.75, 1.0]).log(),
                      ({3: 1, 7: 2}, {5: 3}, {}, {}), (False, False, True, True), {"x": 0})


@pytest.mark.parametrize("forget_target, mean_target, mean_weight", [
    ("uniform", "world_prior_reverse", None), ("world_prior", None, None), ("world_prior_reverse", "uniform", None),
    ("uniform", "world_prior", 3.0)])
def test_each_pass_is_scored_against_its_own_target(forget_target, mean_target, mean_weight):
    """The oracle: the two ablations run by hand and scored by knowledge_off_loss, each with its own target."""
    from pure_reasoner.moe import knowledge_mean
    from pure_reasoner.train.objectives import forget_pass
    from tests.moe.flop_count import SEQ, small_model

    torch.manual_seed(0)
    model = small_model("gate").eval()
    idx_BS, targets_BS = torch.randint(0, 40, (2, SEQ)), torch.randint(0, 40, (2, SEQ))
    forget_BS = torch.rand(2, SEQ) < 0.4
    node_BS = torch.randint(-1, 2, (2, SEQ))  # -1 (uniform), the root or the node after token 3
    prior = _toy_prior()
    objective = ObjectiveConfig(forget_weight=0.7, read_weight=0.5, forget_ablation="both",
                                forget_target=forget_target, mean_forget_target=mean_target,
                                mean_forget_weight=mean_weight)
    mean_target = mean_target or forget_target

    def score(logits_BSV, read_weight, target, forget_weight=0.7):
        loss, _ = knowledge_off_loss(logits_BSV, targets_BS, forget_BS, ~forget_BS, forget_weight, read_weight, node_BS,
                                     None if target == "uniform" else prior, target == "world_prior_reverse")
        return loss

    with torch.no_grad():
        got = forget_pass(model, idx_BS, targets_BS, forget_BS, ~forget_BS, objective, None, node_BS, prior)
        off = score(model(idx_BS, knowledge_off=True).logits_BSV, 0.5, forget_target)
        with knowledge_mean(model, forget_BS):
            mean_BSV = model(idx_BS).logits_BSV
        want = off + score(mean_BSV, 0.0, mean_target, mean_weight or 0.7)
        uniform = off + score(mean_BSV, 0.0, "uniform")
    torch.testing.assert_close(got, want)
    assert mean_target == "uniform" or abs(float(got - uniform)) > 1e-3  # the target matters


def test_mean_forget_target_config_errors():
    with pytest.raises(ValueError, match="mean_forget_target must be null or one of"):
        ObjectiveConfig(forget_weight=1.0, forget_ablation="both", mean_forget_target="names")
    with pytest.raises(ValueError, match="mean_forget_target='world_prior' is the recall_mean pass's own"):
        ObjectiveConfig(forget_weight=1.0, mean_forget_target="world_prior")  # no mean pass
    assert ObjectiveConfig(forget_weight=1.0, forget_ablation="both", mean_forget_target="world_prior").uses_prior
    assert not ObjectiveConfig(forget_weight=1.0, forget_ablation="both", mean_forget_target="uniform").uses_prior
    with pytest.raises(ValueError, match="mean_forget_weight=2.0 is the recall_mean pass's own"):
        ObjectiveConfig(forget_weight=1.0, mean_forget_weight=2.0)  # no mean pass
    with pytest.raises(ValueError, match="mean_forget_weight must be >= 0, got -1.0"):
        ObjectiveConfig(forget_weight=1.0, forget_ablation="both", mean_forget_weight=-1.0)

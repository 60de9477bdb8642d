"""Consult targets at keys (objective.consult_targets=recall_keys): the recall tokens plus the tokens of closed-book
rows that name what a fact is about (a person, a bridge fact's city or company), from the world rows' ``keys``."""

import re

import datasets
import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import ObjectiveConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import TrainData, prepare_data
from pure_reasoner.train.world.drills import FreshDrills
from pure_reasoner.train.world.generator import build_world, corpus_world_config, pretraining_corpus
from tests.train.helpers import compose_config


def test_key_tokens_hand_made():
    tok = data.train_tokenizer(datasets.Dataset.from_dict({"text": ["x"]}), "byte", 257)
    rows = {"text": ["Ada was born in Oslo. Ada studied math.", "Q: Where was Bo born?\nA: Rome."],
            "context": ["", "Bo: Rome. "], "keys": [[[0, 3], [22, 25]], [[0, 2], [23, 25]]]}
    stream, _ = data.tokenize_in_context(datasets.Dataset.from_dict(rows), tok, 48)
    keys = data.key_tokens(datasets.Dataset.from_dict(rows), tok, 48)
    assert keys.shape == stream.shape
    assert tok.decode(stream[keys].tolist()) == "AdaAdaBoBo"
    assert not keys[stream == tok.token_to_id(data.EOD)].any()


def test_key_tokens_on_a_world_stream_spell_the_names():
    world = build_world(corpus_world_config(preset="tiny"))
    docs = pretraining_corpus(world, in_context_fraction=0.5, num_drills=4)
    tok = data.train_tokenizer(docs, "bpe", 384)
    stream, mask = data.tokenize_in_context(docs, tok, 512)
    keys = data.key_tokens(docs, tok, 512)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    assert 0.02 < (keys & closed).float().mean() < 0.5 * closed.float().mean()
    # a closed biography alone: its key tokens spell every occurrence of a person's name (found here by a plain
    # search over the text, not from the spans), in order; a token may carry a leading space
    row = next(r for r in docs if not r["context"] and r["kind"] == "bio")
    pattern = "|".join(re.escape(p.name) for p in sorted(world.people, key=lambda p: -len(p.name)))
    names = re.findall(pattern, row["text"])
    assert len(names) >= 4
    alone = datasets.Dataset.from_list([{"text": row["text"], "context": "", "keys": row["keys"]}])
    stream, _ = data.tokenize_in_context(alone, tok, 512)
    keys = data.key_tokens(alone, tok, 512)
    assert tok.decode(stream[keys].tolist()).replace(" ", "") == "".join(names).replace(" ", "")


def test_one_pass_gives_each_column_as_alone():
    """``span_codes`` encodes the rows once for recall codes and keys together: each column as when asked alone
    (whose values the tests above check against the text), and a column it does not know is an error."""
    docs = pretraining_corpus(preset="tiny", in_context_fraction=0.5, num_drills=4)
    tok = data.train_tokenizer(docs, "bpe", 384)
    both = data.span_codes(docs, tok, 512, ["recall", "keys"])
    assert torch.equal(both["recall"], data.recall_token_codes(docs, tok, 512))
    assert torch.equal(both["keys"] > 0, data.key_tokens(docs, tok, 512))
    assert both["recall"].any() and both["keys"].any() and not torch.equal(both["recall"] > 0, both["keys"] > 0)
    with pytest.raises(ValueError, match="span columns must be among"):
        data.span_codes(docs, tok, 512, ["names"])


def test_key_spans_name_subjects_never_values():
    world = build_world(corpus_world_config(preset="tiny"))
    docs = pretraining_corpus(world, in_context_fraction=0.5, num_drills=4)
    subjects = set(world.employer_city) | set(world.city_country)
    names = {p.name for p in world.people} | {p.name for p in world.unseen}
    for row in docs:
        full = row["context"] + row["text"]
        keyed = {full[a:b] for a, b in row["keys"]}
        assert keyed and not any(a < d and c < b for a, b in row["keys"] for c, d in row["recall"]), row["kind"]
        if row["kind"] == "world":
            assert keyed <= subjects, keyed - subjects
        elif row["kind"] == "bio" and not row["context"]:  # (a context also states bridge facts about places)
            assert keyed <= names, keyed - names


def _micro_batch(*overrides):
    cfg = compose_config("experiment=decoupling_tiny", "name=t", "model.knowledge.consult_loss_coef=0.1",
                         "data.fresh_drills=2", *overrides)
    docs = data.load_documents(cfg.data, recall=True, keys=True)
    tok = data.train_tokenizer(docs, "bpe", cfg.model.vocab_size)
    stream, mask = data.tokenize_in_context(docs, tok, cfg.data.seq_len)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    recall = data.recall_tokens(docs, tok, cfg.data.seq_len) & closed
    keys = data.key_tokens(docs, tok, cfg.data.seq_len) & closed
    packed = data.PackedSequences(stream, cfg.data.seq_len, 0, loss_mask=mask, closed=closed, recall=recall, keys=keys)
    drills = FreshDrills(build_world(corpus_world_config(**cfg.data.generator_kwargs)), tok, cfg.data.seq_len)
    batch = TrainData(packed, drills).micro_batch(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), step=3, micro=0)
    return batch, tok, packed


def test_micro_batch_consult_targets_are_recall_and_key_tokens():
    recall, _, _ = _micro_batch("objective.consult_targets=recall")
    both, tok, packed = _micro_batch("objective.consult_targets=recall_keys")
    recall_BS, both_BS = recall["consult_target_BS"], both["consult_target_BS"]
    assert recall_BS.any() and not (recall_BS & ~both_BS).any()  # every recall target stays a target
    extra_BS = both_BS & ~recall_BS
    assert extra_BS.sum() > 0.3 * recall_BS.sum()
    assert not both_BS[-2:].any()  # drill sequences: no closed-book tokens
    # the extra targets are the input tokens that are (parts of) names: decoded, they are capitalised words
    idx_BS = both["idx_BS"]
    words = tok.decode(idx_BS[extra_BS].tolist(), skip_special_tokens=False)
    assert all(w[:1].isupper() for w in words.split()), words[:200]
    positions = data.micro_batch_positions(3, 0, 0, 6, 1, 1)
    assert torch.equal(extra_BS[:6], packed.keys(positions) & ~recall_BS[:6])


def test_key_targets_config_errors():
    with pytest.raises(ValueError, match="route_tokens"):
        ObjectiveConfig(route_tokens="recall_keys")
    with pytest.raises(ValueError, match="recall_keys reads the rows' key spans"):
        compose_config("data.source=world", "data.path=/nonexistent", "model.knowledge.consult_loss_coef=0.1",
                       "objective.consult_targets=recall_keys")
    # a source or generator rows without key spans: tests/train/test_recall_targets.py


def test_key_tails_hand_made():
    """The last word of each key span, counted over ``context + text``; a one-word key stays whole."""
    rows = datasets.Dataset.from_dict({
        "text": ["Bririam Troupei works for Thastudrei Systems.", "Q: Where was Bo born?\nA: Rome."],
        "context": ["", "Ann Lee: Rome. "], "keys": [[[0, 15], [26, 44]], [[0, 7], [28, 30]]]})
    tails = data.with_key_tails(rows)
    assert tails["keys"] == [[[8, 15], [37, 44]], [[4, 7], [28, 30]]]
    assert [(r["context"] + r["text"])[b:e] for r in tails for b, e in r["keys"]] == ["Troupei", "Systems", "Lee", "Bo"]
    assert tails["text"] == rows["text"] and tails["context"] == rows["context"]


def _prepared_batch(tmp_path, targets: str):
    """A micro-batch as training builds it (``loop.prepare_data``: corpus, spans, tokenizer, packing)."""
    cfg = compose_config("experiment=decoupling_tiny", "name=t", "model.knowledge.consult_loss_coef=0.1",
                         "data.fresh_drills=2", f"objective.consult_targets={targets}")
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    train_data, tok = prepare_data(cfg, tmp_path / targets, info)
    return train_data.micro_batch(cfg, info, step=3, micro=0), tok


def test_micro_batch_key_tails_are_the_names_last_words(tmp_path):
    """``recall_key_tails``: the recall targets stay; the name targets are a strict subset of ``recall_keys``'s:
    of each run of name tokens, the ones left out come before the ones kept (a name's last word ends it)."""
    (keys, tok), (tails, _), (recall, _) = (_prepared_batch(tmp_path, t)
                                             for t in ("recall_keys", "recall_key_tails", "recall"))
    keys_BS, tails_BS, recall_BS = (b["consult_target_BS"] for b in (keys, tails, recall))
    assert torch.equal(tails["idx_BS"], keys["idx_BS"])
    assert not (recall_BS & ~tails_BS).any() and not (tails_BS & ~keys_BS).any()
    name_BS, tail_BS = keys_BS & ~recall_BS, tails_BS & ~recall_BS
    assert 0 < tail_BS.sum() < name_BS.sum()
    idx_BS = keys["idx_BS"]
    for b, s in zip(*torch.nonzero(name_BS & ~tail_BS, as_tuple=True), strict=True):
        run = name_BS[b, s:]
        end = run.numel() if run.all() else int(run.long().argmin())
        assert tail_BS[b, s : s + end].any(), tok.decode(idx_BS[b, s : s + end].tolist())

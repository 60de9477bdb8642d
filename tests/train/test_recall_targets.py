"""Consult targets on recall tokens (objective.consult_targets=recall): the tokens of closed-book rows whose next
token is part of a fact's value, from the world rows' ``recall`` spans."""

import datasets
import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import DataConfig, ObjectiveConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import TrainData
from pure_reasoner.train.world.drills import FreshDrills
from pure_reasoner.train.world.generator import build_world, corpus_world_config, pretraining_corpus
from tests.train.helpers import compose_config


def _byte_tok():
    return data.train_tokenizer(datasets.Dataset.from_dict({"text": ["x"]}), "byte", 257)


def test_recall_tokens_hand_made():
    tok = _byte_tok()
    # a plain row with two recalled values; a context row whose span covers context ("Rome") and text ("Rome")
    rows = {"text": ["Ada was born in Oslo. Ada studied math.", "Q: Where?\nA: Rome."], "context": ["", "Bo: Rome. "],
            "recall": [[[16, 20], [34, 38]], [[4, 8], [23, 27]]]}
    stream, mask = data.tokenize_in_context(datasets.Dataset.from_dict(rows), tok, 32)
    recall = data.recall_tokens(datasets.Dataset.from_dict(rows), tok, 32)
    assert recall.shape == stream.shape
    flagged = tok.decode(stream[recall].tolist())
    assert flagged == "OslomathRomeRome"
    assert not recall[stream == tok.token_to_id(data.EOD)].any()  # EOD and padding are never recall tokens


def test_recall_tokens_on_a_world_stream_match_the_values():
    docs = pretraining_corpus(preset="tiny", in_context_fraction=0.5, num_drills=4)
    tok = data.train_tokenizer(docs, "bpe", 384)
    stream, mask = data.tokenize_in_context(docs, tok, 512)
    recall = data.recall_tokens(docs, tok, 512)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    assert 0.02 < (recall & closed).float().mean() < closed.float().mean()
    # in the first closed row, the recall tokens spell the recalled values (a token may carry a leading space)
    first = next(r for r in docs if not r["context"])
    values = "".join(first["text"][a:b] for a, b in first["recall"])
    start = int(closed.nonzero()[0])
    end = start + int((stream[start:] == tok.token_to_id(data.EOD)).nonzero()[0])
    got = tok.decode(stream[start:end][recall[start:end]].tolist())
    assert got.replace(" ", "") == values.replace(" ", "")


def test_recall_spans_are_the_values_never_the_subjects():
    world = build_world(corpus_world_config(preset="tiny"))
    docs = pretraining_corpus(world, in_context_fraction=0.5, num_drills=4)
    bridge_values = set(world.employer_city.values()) | set(world.city_country.values())
    assert not bridge_values & set(world.employer_city)  # so an employer name among them is a wrong span
    names = {p.name for p in world.people}
    kinds = set()
    for row in docs:
        full = row["context"] + row["text"]
        recalled = {full[a:b] for a, b in row["recall"]}
        kinds.add(row["kind"])
        if row["kind"] == "world":  # bridge facts: only the country / headquarters city, never the subject
            assert recalled and recalled <= bridge_values, recalled - bridge_values
        elif row["kind"] == "bio":  # a person's values, never the name
            assert len(recalled) >= 4 and not recalled & names, recalled
    assert {"world", "bio"} <= kinds


def test_micro_batch_consult_targets_are_closed_book_recall_tokens():
    common = ["objective.route_knowledge=true", "model.knowledge.consult_loss_coef=0.1"]
    batches = {}
    settings = {"rows": ["objective.consult_targets=rows"], "recall": ["objective.consult_targets=recall"],
                "both": ["objective.consult_targets=recall", "objective.route_tokens=recall"]}
    for key, overrides in settings.items():
        cfg = compose_config("experiment=decoupling_tiny", "name=t", *common, *overrides, "data.fresh_drills=2")
        docs = data.load_documents(cfg.data, recall=cfg.uses_recall_tokens)
        tok = data.train_tokenizer(docs, "bpe", cfg.model.vocab_size)
        stream, mask = data.tokenize_in_context(docs, tok, cfg.data.seq_len)
        closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
        recall = data.recall_tokens(docs, tok, cfg.data.seq_len) & closed if cfg.uses_recall_tokens else None
        packed = data.PackedSequences(stream, cfg.data.seq_len, 0, loss_mask=mask, closed=closed, recall=recall)
        drills = FreshDrills(build_world(corpus_world_config(**cfg.data.generator_kwargs)), tok, cfg.data.seq_len)
        batches[key] = TrainData(packed, drills).micro_batch(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), step=3,
                                                                micro=0)
    rows, recall = batches["rows"], batches["recall"]
    assert torch.equal(rows["reasoning_frozen_BS"], recall["reasoning_frozen_BS"])  # routing: whole rows either way
    target_BS = recall["consult_target_BS"]
    assert target_BS.any() and not (target_BS & ~rows["consult_target_BS"]).any()  # a subset of closed-book tokens
    assert target_BS.sum() < 0.5 * rows["consult_target_BS"].sum()
    assert not target_BS[-2:].any()  # drill sequences: nothing to recall
    # route_tokens=recall: the frozen tokens are those same recall tokens
    assert torch.equal(batches["both"]["reasoning_frozen_BS"], target_BS)
    assert torch.equal(batches["both"]["consult_target_BS"], target_BS)


def test_recall_targets_config_errors():
    with pytest.raises(ValueError, match="consult_targets"):
        ObjectiveConfig(consult_targets="facts")
    with pytest.raises(ValueError, match="route_tokens"):
        ObjectiveConfig(route_tokens="names")
    with pytest.raises(ValueError, match="route_tokens=recall / forget_weight need data.generator"):
        compose_config("data.source=generator", "data.generator=tests.train.test_recall_targets:_rows_without_recall",
                       "data.in_context_fraction=0.5", "model.knowledge.consult_loss_coef=0.1",
                       "objective.consult_targets=recall")


@pytest.mark.parametrize("column", ["recall", "keys"])
def test_span_columns_need_a_generator_whose_rows_carry_them(column):
    with pytest.raises(ValueError, match=f"{'key' if column == 'keys' else column} spans come from a generator"):
        data.load_documents(DataConfig(), **{column: True})
    gen = DataConfig(source="generator", generator="tests.train.test_recall_targets:_rows_without_recall",
                     in_context_fraction=0.5)
    with pytest.raises(ValueError, match=f"no '{column}' spans"):
        data.load_documents(gen, **{column: True})


def _rows_without_recall(in_context_fraction: float = 0.0):
    yield {"text": "a", "context": ""}


def test_a_generator_row_without_text_is_a_value_error():
    gen = DataConfig(source="generator", generator="tests.train.test_recall_targets:_rows_without_recall",
                     text_field="body")
    with pytest.raises(ValueError, match="item 0 has no text field 'body'"):
        data.load_documents(gen)

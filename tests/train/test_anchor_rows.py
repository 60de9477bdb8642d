"""The anchor on marked rows only (objective.anchor_rows=marked): the update corpus marks exactly its replayed rows,
the marked recall tokens are those of marked rows, micro-batches anchor them and nothing else, and the config
refuses what cannot work."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import DataConfig, ObjectiveConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import TrainData
from pure_reasoner.train.relocation import Relocation
from pure_reasoner.train.world.generator import build_world, world_config
from pure_reasoner.train.world_update import UpdateConfig, build_update, update_corpus, update_kwargs, update_rows
from tests.train.helpers import compose_config

WORLD = build_world(world_config("tiny"))
CFG = UpdateConfig(seed=3, new_people=8, changed_facts=5, replay=1.5)
CPU = DistInfo(0, 1, 0, 1, torch.device("cpu"))


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "anchor"}, sort_keys=True)


def test_update_corpus_marks_exactly_the_replayed_rows():
    rows = update_corpus(**update_kwargs(WORLD.cfg, CFG)).to_list()
    own = Counter(map(_key, update_rows(build_update(WORLD, dataclasses.replace(CFG, replay=0.0)))))
    marked = Counter(_key(r) for r in rows if r["anchor"])
    unmarked = Counter(_key(r) for r in rows if not r["anchor"])
    assert unmarked == own  # the update's own rows: new people, restatements
    assert marked == Counter(map(_key, rows)) - own and marked.total() == round(1.5 * own.total())
    assert "anchor" not in update_rows(build_update(WORLD, CFG))[0]  # the column is the corpus's, not the rows'


def test_recall_tokens_of_marked_rows_only():
    tok = data.train_tokenizer(datasets.Dataset.from_dict({"text": ["x"]}), "byte", 257)
    rows = datasets.Dataset.from_dict({
        "text": ["Ada was born in Oslo. Ada studied math.", "Q: Where?\nA: Rome.", "Bo lives in Lima."],
        "context": ["", "", ""], "recall": [[[16, 20], [34, 38]], [[13, 17]], [[12, 16]]],
        "anchor": [False, True, True]})
    stream, _ = data.tokenize_in_context(rows, tok, 32)
    codes = data.recall_token_codes(rows, tok, 32)
    assert tok.decode(stream[data.recall_tokens(rows, tok, 32)].tolist()) == "OslomathRomeLima"
    assert tok.decode(stream[codes == 2].tolist()) == "RomeLima" and tok.decode(stream[codes == 1].tolist()) == \
        "Oslomath"
    unmarked = rows.remove_columns("anchor")  # without the column every row is unmarked
    assert torch.equal(data.recall_token_codes(unmarked, tok, 32), (codes > 0).long())


def _train_data(cfg, marks) -> TrainData:
    docs = data.load_documents(cfg.data, recall=True)
    docs = docs.add_column("anchor", marks(len(docs)))
    tok = data.train_tokenizer(docs, "bpe", cfg.model.vocab_size)
    stream, mask = data.tokenize_in_context(docs, tok, cfg.data.seq_len)
    closed = data.closed_book_tokens(stream, mask, tok.token_to_id(data.EOD))
    recall = data.recall_tokens(docs, tok, cfg.data.seq_len) & closed
    anchor = (data.recall_token_codes(docs, tok, cfg.data.seq_len) == 2) & closed
    return TrainData(data.PackedSequences(stream, cfg.data.seq_len, 0, loss_mask=mask, closed=closed, recall=recall,
                                          anchor=anchor), None)


@pytest.mark.parametrize("rows", ["all", "marked"])
def test_micro_batch_anchors_the_marked_rows_recall_tokens(rows):
    cfg = compose_config("experiment=decoupling_tiny", "name=t", "objective.teacher=unused",
                         "objective.anchor_weight=1", f"objective.anchor_rows={rows}", "data.fresh_drills=0")
    every_other = _train_data(cfg, lambda n: [i % 2 == 0 for i in range(n)])
    none = _train_data(cfg, lambda n: [False] * n)
    anchor_BS = every_other.micro_batch(cfg, CPU, step=3, micro=0)["anchor_BS"]
    positions = data.micro_batch_positions(3, 0, 0, cfg.train.micro_batch_size, cfg.train.grad_accum, 1)
    recall_BS = every_other.packed.recall(positions)
    if rows == "all":  # every recall token, the marks unread
        assert torch.equal(anchor_BS, recall_BS)
        assert torch.equal(none.micro_batch(cfg, CPU, step=3, micro=0)["anchor_BS"], anchor_BS)
        return
    assert anchor_BS.any() and not (anchor_BS & ~recall_BS).any() and anchor_BS.sum() < recall_BS.sum()
    assert not none.micro_batch(cfg, CPU, step=3, micro=0)["anchor_BS"].any()  # no row marked, nothing anchored


def test_anchor_rows_config_errors(tmp_path):
    with pytest.raises(ValueError, match="objective.anchor_rows must be one of"):
        ObjectiveConfig(teacher="t", anchor_weight=1.0, anchor_rows="replay")
    with pytest.raises(ValueError, match="anchor_rows='marked' chooses the anchor's rows: it needs"):
        ObjectiveConfig(anchor_rows="marked")
    with pytest.raises(ValueError, match="anchor marks come from a generator's rows"):
        data.load_documents(DataConfig(), anchor=True)
    world = compose_config("experiment=decoupling_tiny", "name=t").data  # the world generator writes no marks
    with pytest.raises(ValueError, match="has no bool 'anchor' field"):
        data.load_documents(world, recall=True, anchor=True)
    # in-run relocation: the steps before relocate_at have no anchor, so they anchor no rows either
    cfg = compose_config("experiment=first_run", "name=t", "objective.anchor_rows=marked")
    assert Relocation(cfg, Path(tmp_path)).before.objective.anchor_rows == "all"
    assert Relocation(cfg, Path(tmp_path)).after.objective.anchors_marked_rows

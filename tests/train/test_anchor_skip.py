"""Spans left out of the anchor (objective.anchor_skip): the skipped spans are the recall spans whose text matches,
micro-batches anchor every other recall token and none of theirs, and the config refuses what cannot work."""

from pathlib import Path

import datasets
import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import ObjectiveConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import prepare_data
from pure_reasoner.train.relocation import Relocation
from tests.train.helpers import compose_config

CPU = DistInfo(0, 1, 0, 1, torch.device("cpu"))


def test_skipped_spans_are_the_matching_recall_spans():
    tok = data.train_tokenizer(datasets.Dataset.from_dict({"text": ["x"]}), "byte", 257)
    text = "Ada was born on May 3, 1990 in Oslo."
    rows = datasets.Dataset.from_dict({
        "text": [text, "Q: Where?\nA: Rome.", "Q: When?\nA: 1971."], "context": ["", "", "Bo, 1971."],
        "recall": [[[16, 27], [31, 35]], [[13, 17]], [[9 + 12, 9 + 16]]]})
    skipped = data.with_skipped_spans(rows, "[0-9]")
    assert skipped["anchor_skip"] == [[[16, 27]], [], [[21, 25]]]  # the date, nothing, the year after the context
    stream, _ = data.tokenize_in_context(skipped, tok, 64)
    codes = data.span_codes(skipped, tok, 64, ["recall", "anchor_skip"])
    assert tok.decode(stream[codes["anchor_skip"] > 0].tolist()) == "May 3, 19901971"
    assert tok.decode(stream[(codes["recall"] > 0) & (codes["anchor_skip"] == 0)].tolist()) == "OsloRome"


@pytest.mark.parametrize("skip", [None, "[0-9]"])
def test_micro_batch_leaves_the_skipped_spans_unanchored(tmp_path, skip):
    over = [] if skip is None else [f"objective.anchor_skip='{skip}'"]
    cfg = compose_config("experiment=decoupling_tiny", "name=t", "objective.teacher=unused",
                         "objective.anchor_weight=1", "data.fresh_drills=0", *over)
    train_data, tok = prepare_data(cfg, Path(tmp_path), CPU)
    anchored = recalled = 0
    for step in range(4):
        batch = train_data.micro_batch(cfg, CPU, step=step, micro=0)
        positions = data.micro_batch_positions(step, 0, 0, cfg.train.micro_batch_size, cfg.train.grad_accum, 1)
        recall_BS, anchor_BS = train_data.packed.recall(positions), batch["anchor_BS"]
        assert not (anchor_BS & ~recall_BS).any()
        targets = batch["targets_BS"]
        has_digit = [any(c.isdigit() for c in tok.decode([t])) for t in targets[recall_BS].tolist()]
        anchored_digit = [any(c.isdigit() for c in tok.decode([t])) for t in targets[anchor_BS].tolist()]
        assert any(has_digit)  # dates are recalled here
        assert any(anchored_digit) == (skip is None)  # and anchored only when nothing is skipped
        anchored, recalled = anchored + int(anchor_BS.sum()), recalled + int(recall_BS.sum())
    assert (anchored == recalled) == (skip is None) and anchored > 0


def test_anchor_skip_config_errors(tmp_path):
    with pytest.raises(ValueError, match="anchor_skip='x' leaves spans out of the anchor: it needs"):
        ObjectiveConfig(anchor_skip="x")
    with pytest.raises(ValueError, match=r"anchor_skip='\[0-9' is not a regular expression"):
        ObjectiveConfig(teacher="t", anchor_weight=1.0, anchor_skip="[0-9")
    # in-run relocation: the steps before relocate_at have no anchor, so they skip nothing either
    cfg = compose_config("experiment=first_run", "name=t", "objective.anchor_skip='[0-9]'")
    assert Relocation(cfg, Path(tmp_path)).before.objective.anchor_skip is None
    assert Relocation(cfg, Path(tmp_path)).after.objective.anchors_subset

"""Reading drills new in every micro-batch (data.fresh_drills), multi-question drills, and their batches."""

import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import WORLD_GENERATOR, DataConfig
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.loop import TrainData
from pure_reasoner.train.objectives import IGNORE_INDEX
from pure_reasoner.train.world.drills import FreshDrills
from pure_reasoner.train.world.generator import drill_rows
from pure_reasoner.train.world.text import ATTRIBUTES, TWO_HOP
from tests.train.helpers import compose_config, metrics, run_in_process


def test_multi_question_drill_rows(world):
    rows = drill_rows(world, 7, 5, questions=6)
    assert rows == drill_rows(world, 7, 5, questions=6) and rows != drill_rows(world, 8, 5, questions=6)
    for row in rows:
        full = row["context"] + row["text"]
        lines = row["text"].split("\n")
        assert len(lines) == 12 and all(q.startswith("Q: ") for q in lines[::2])
        answers = [s for s in row["spans"] if s["type"] == "answer"]
        assert len(answers) == 6
        for span, line in zip(answers, lines[1::2], strict=True):
            assert line == f"A: {full[span['start'] : span['end']]}."
            # the answer is stated in the context (directly, or by a bridge fact for two-hop questions)
            assert full[span["start"] : span["end"]] in row["context"]
        assert not any(n in full for n in world.names)
    with pytest.raises(ValueError, match="questions"):
        drill_rows(world, 0, 1, questions=0)
    pairs = (world.cfg.num_distractors + 1) * len(ATTRIBUTES + TWO_HOP)
    with pytest.raises(ValueError, match="exceeds"):
        drill_rows(world, 0, 1, questions=pairs + 1)


def test_fresh_drill_batches(world, tok):
    drills = FreshDrills(world, tok, seq_len=512, questions=3)
    idx, targets = drills.batch(5, 3)
    again_idx, again_targets = drills.batch(5, 3)
    other_idx, _ = drills.batch(6, 3)
    assert idx.shape == targets.shape == (3, 512) and idx.dtype == torch.int64
    assert torch.equal(idx, again_idx) and torch.equal(targets, again_targets) and not torch.equal(idx, other_idx)
    eod = tok.token_to_id(data.EOD)
    for b in range(3):
        text = tok.decode(idx[b].tolist(), skip_special_tokens=False)
        assert not any(name in text for name in world.names)
        # Loss only on the QA lines: per drill (tokens up to its EOD), the predicted tokens are exactly its text.
        predicted = torch.zeros(512, dtype=torch.bool)
        predicted[1:] = targets[b][:-1] != IGNORE_INDEX  # token s + 1 is predicted at position s
        ends = (idx[b] == eod).nonzero().flatten().tolist()
        start, drills_seen = 0, 0
        for end in ends:
            unit, scored = idx[b][start:end], predicted[start:end]
            if scored.any():
                qa = tok.decode(unit[scored].tolist())
                context = tok.decode(unit[~scored].tolist())
                assert qa.startswith("Q: ") and qa.count("Q: ") == 3 and qa.endswith(".")
                assert "Q:" not in context and context.count(".") >= 10  # two biographies
                drills_seen += 1
            start = end + 1
        assert drills_seen >= 1


def test_micro_batches_mix_corpus_and_drills_by_global_index(world, tok):
    cfg = compose_config(
        "data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny", "data.seq_len=512",
        "model.max_seq_len=512", "data.fresh_drills=2", "train.micro_batch_size=4", "train.grad_accum=2",
    )
    stream = torch.randint(0, 300, (512 * 20 + 1,))
    packed = data.PackedSequences(stream, 512, seed=0)
    source = TrainData(packed, FreshDrills(world, tok, 512, questions=2))
    one_rank = [source.micro_batch(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), 3, m) for m in (0, 1)]
    cfg.train.grad_accum = 1
    two_ranks = [source.micro_batch(cfg, DistInfo(r, 2, r, 2, torch.device("cpu")), 3, 0) for r in (0, 1)]
    for a, b in zip(one_rank, two_ranks, strict=True):
        assert a.keys() == b.keys() == {"idx_BS", "targets_BS"}
        assert torch.equal(a["idx_BS"], b["idx_BS"]) and torch.equal(a["targets_BS"], b["targets_BS"])
    first = one_rank[0]["idx_BS"]
    assert first.shape == (4, 512)
    assert torch.equal(first[:2], packed.batch(data.micro_batch_positions(3, 0, 0, 2, 2, 1))[0])  # 2 corpus seqs
    assert not torch.equal(one_rank[0]["idx_BS"][2:], one_rank[1]["idx_BS"][2:])  # new drills per micro-batch


def test_fresh_drill_config_errors():
    with pytest.raises(ValueError, match="fresh_drills"):
        DataConfig(source="shakespeare", fresh_drills=1)
    with pytest.raises(ValueError, match="fresh_drills"):
        DataConfig(source="generator", generator=WORLD_GENERATOR, fresh_drills=-1, in_context_fraction=0.5)
    world = ("data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny")
    with pytest.raises(ValueError, match="micro_batch_size"):
        compose_config(*world, "data.fresh_drills=8", "train.micro_batch_size=8")


def test_drill_too_long_for_a_sequence_fails_before_training(world, tok):
    with pytest.raises(ValueError, match="drill_questions"):
        FreshDrills(world, tok, seq_len=64, questions=2)


def test_run_with_fresh_drills_end_to_end(tmp_path):
    summary = run_in_process(
        tmp_path / "run", "data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny",
        "+data.generator_kwargs.num_drills=0", "+data.generator_kwargs.drill_questions=2", "data.fresh_drills=2",
        "data.seq_len=384", "model.max_seq_len=384", "data.max_chars=null",
    )
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]
    assert summary.final_loss == pytest.approx(rows[-1]["loss"])

"""Counterfactual reading drills (data.counterfactual_drills): known people with changed values in context, the
answers following the context; off, the drills are exactly the fresh ones."""

import math

import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import WORLD_GENERATOR, DataConfig
from pure_reasoner.train.objectives import IGNORE_INDEX
from pure_reasoner.train.world.counterfactual import counterfactual_drill, with_counterfactuals
from pure_reasoner.train.world.drills import FreshDrills
from pure_reasoner.train.world.generator import build_world, drill_rows, world_config
from pure_reasoner.train.world.text import ATTRIBUTES, QUESTIONS
from tests.train.helpers import RECIPE_RUN, metrics, run_in_process


def _asked(world, qa_text: str) -> list[tuple[str, str, str]]:
    """(person name, attribute, answer) of each ``Q: ...\\nA: ....`` pair, the attribute read off the question."""
    lines = qa_text.split("\n")
    assert len(lines) % 2 == 0
    out = []
    for q, a in zip(lines[::2], lines[1::2], strict=True):
        assert q.startswith("Q: ") and a.startswith("A: ") and a.endswith(".")
        found = [(p.name, attr) for p in world.people for attr in ATTRIBUTES
                 if q[3:] == QUESTIONS[attr].format(name=p.name)]
        assert len(found) == 1, q
        out.append((*found[0], a[3:-1]))
    return out


def _names(row: dict) -> set[str]:
    return {s["entity"] for s in row["spans"] if s["type"] == "name"}


def _stated(row: dict, name: str) -> dict[str, str]:
    """The values the row's context states for ``name``, read off its spans."""
    full = row["context"] + row["text"]
    return {s["type"]: full[s["start"] : s["end"]] for s in row["spans"]
            if s["entity"] == name and s["type"] in ATTRIBUTES and s["end"] <= len(row["context"])}


def _check_counterfactual(world, row: dict, questions: int) -> None:
    people = {p.name: p for p in world.people}
    asked = _asked(world, row["text"])
    assert len(asked) == min(questions, len(ATTRIBUTES) - 1)
    (name,) = {n for n, _, _ in asked}
    memorised, stated = world.values(people[name]), _stated(row, name)
    assert set(stated) == set(ATTRIBUTES)  # the person's whole biography is in context
    changed = {attr for _, attr, _ in asked}
    for _, attr, answer in asked:
        assert answer != memorised[attr] and answer == stated[attr]
    assert all(stated[a] == memorised[a] for a in ATTRIBUTES if a not in changed)
    # the distractors are fresh people: no other world name in the row
    assert _names(row) & world.names == {name} and len(_names(row)) == world.cfg.num_distractors + 1
    assert row["kind"] == "drill" and row["context"]


@pytest.mark.parametrize("questions", [1, 3, 5])
def test_counterfactual_rows(world, questions):
    share, steps, count = 0.3, 60, 8
    total = about_known = 0
    for step in range(steps):
        fresh = drill_rows(world, step, count, questions=questions)
        rows = with_counterfactuals(world, fresh, step, share, questions=questions)
        assert rows == with_counterfactuals(world, fresh, step, share, questions=questions)
        for row, kept in zip(rows, fresh, strict=True):
            total += 1
            if _names(row) & world.names:
                about_known += 1
                _check_counterfactual(world, row, questions)
            else:
                assert row == kept  # a drill not replaced is the fresh one, unchanged
    sd = math.sqrt(share * (1 - share) / total)
    assert abs(about_known / total - share) < 4 * sd
    other = with_counterfactuals(world, drill_rows(world, 1, count, questions=questions), 0, share, questions=questions)
    assert with_counterfactuals(world, drill_rows(world, 1, count, questions=questions), 1, share,
                                questions=questions) != other


def test_counterfactual_drill_format_is_the_eval_splits(world):
    """One question: the counterfactual split's context (bio with one value changed + distractors, no bridges)
    and its ``Q: ...\\nA: value.`` continuation."""
    import random

    person = world.people[5]
    row = counterfactual_drill(world, random.Random(0), person, world.fresh_people("t", 1))
    (_, attribute, answer), = _asked(world, row["text"])
    assert row["text"] == f"Q: {QUESTIONS[attribute].format(name=person.name)}\nA: {answer}."
    assert row["context"].count("\n") == 2 and answer != world.values(person)[attribute]
    with pytest.raises(ValueError, match="questions"):
        counterfactual_drill(world, random.Random(0), person, [], questions=0)


def test_off_leaves_the_fresh_drills_unchanged(world, tok):
    rows = drill_rows(world, 4, 6, questions=2)
    assert with_counterfactuals(world, rows, 4, 0.0, questions=2) is rows
    # a share too small to replace anything draws nothing the fresh drills depend on
    assert with_counterfactuals(world, rows, 4, 1e-12, questions=2) == rows
    default, off = FreshDrills(world, tok, 512, questions=2), FreshDrills(world, tok, 512, 2, counterfactual=0.0)
    tiny, on = FreshDrills(world, tok, 512, 2, counterfactual=1e-12), FreshDrills(world, tok, 512, 2, 1.0)
    for key in (0, 7):
        a, b, c, d = (s.batch(key, 3) for s in (default, off, tiny, on))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
        assert not torch.equal(a[0], d[0])
    assert DataConfig().counterfactual_drills == 0.0


def test_counterfactual_batches_score_the_answers_only(world, tok):
    drills = FreshDrills(world, tok, seq_len=512, questions=2, counterfactual=1.0)
    idx, targets = drills.batch(5, 3)
    again = drills.batch(5, 3)
    assert torch.equal(idx, again[0]) and torch.equal(targets, again[1])
    assert not torch.equal(idx, drills.batch(6, 3)[0])
    eod = tok.token_to_id(data.EOD)
    people = {p.name: p for p in world.people}
    seen = 0
    for b in range(3):
        predicted = torch.zeros(512, dtype=torch.bool)
        predicted[1:] = targets[b][:-1] != IGNORE_INDEX  # token s + 1 is predicted at position s
        start = 0
        for end in (idx[b] == eod).nonzero().flatten().tolist():
            unit, scored = idx[b][start:end], predicted[start:end]
            if scored.any():
                qa, context = tok.decode(unit[scored].tolist()), tok.decode(unit[~scored].tolist())
                assert "Q:" not in context
                # the scored tokens are exactly the QA lines: two counterfactual answers about a known person
                asked = _asked(world, qa)
                assert len(asked) == 2
                for name, attr, answer in asked:
                    assert name in context and answer in context and answer != world.values(people[name])[attr]
                seen += 1
            start = end + 1
    assert seen >= 3


def test_invalid_shares_raise():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"counterfactual_drills must be in \\[0, 1\\], got {bad}"):
            DataConfig(source="generator", generator=WORLD_GENERATOR, in_context_fraction=0.5, fresh_drills=1,
                       counterfactual_drills=bad)
    with pytest.raises(ValueError, match="counterfactual_drills=0.5 is a share of the fresh drills"):
        DataConfig(source="generator", generator=WORLD_GENERATOR, in_context_fraction=0.5, counterfactual_drills=0.5)
    world = build_world(world_config("tiny", seed=3))
    with pytest.raises(ValueError, match="got 2"):
        with_counterfactuals(world, drill_rows(world, 0, 2), 0, 2)


def test_recipe_with_counterfactual_drills_end_to_end(tmp_path):
    summary = run_in_process(tmp_path / "run", "data.counterfactual_drills=0.5", base=RECIPE_RUN)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert summary.steps == 12 and summary.final_loss == pytest.approx(rows[-1]["loss"])
    assert "counterfactual_drills: 0.5" in (tmp_path / "run" / "config.yaml").read_text()

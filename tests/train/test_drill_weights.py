"""Weighted drill questions (data.drill_attribute_weights): what the fresh and counterfactual drills ask is drawn in
proportion to the weights; unset, the drills are exactly the unweighted ones."""

import math
import re
from functools import cache

import pytest

from pure_reasoner.train.config import WORLD_GENERATOR, DataConfig
from pure_reasoner.train.world.counterfactual import with_counterfactuals
from pure_reasoner.train.world.drills import FreshDrills
from pure_reasoner.train.world.generator import drill_rows
from pure_reasoner.train.world.text import ATTRIBUTES, QUESTIONS, TWO_HOP

ALL = ATTRIBUTES + TWO_HOP
_PATTERNS = {a: re.compile(re.escape(q).replace(re.escape("{name}"), ".+") + "$") for a, q in QUESTIONS.items()}


def _attributes_asked(row: dict) -> list[str]:
    """The attribute of each ``Q: ...`` line, read off the question's wording."""
    out = []
    for line in row["text"].split("\n")[::2]:
        assert line.startswith("Q: ")
        (attr,) = [a for a, pattern in _PATTERNS.items() if pattern.match(line[3:])]
        out.append(attr)
    return out


def _expected_heavy(heavy: int, light: int, w: float, draws: int) -> float:
    """Expected number of heavy items among ``draws`` drawn one by one without replacement, each next with
    probability proportional to its weight (``heavy`` items of weight w, ``light`` of weight 1): the sequential
    definition, computed exactly by recursion (an oracle independent of the sampler's key trick)."""

    @cache
    def e(h: int, n: int, k: int) -> float:  # h heavy and n light items left, k draws to go
        if k == 0 or h + n == 0:
            return 0.0
        p = h * w / (h * w + n)
        return p * (1 + e(h - 1, n, k - 1)) + (1 - p) * (e(h, n - 1, k - 1) if n else 0.0)

    return e(heavy, light, draws)


def _count(rows: list[dict], attribute: str) -> tuple[int, int]:
    asked = [a for row in rows for a in _attributes_asked(row)]
    return asked.count(attribute), len(asked)


def test_unset_weights_are_the_unweighted_drills(world, tok):
    for questions in (1, 3):
        rows = drill_rows(world, 2, 5, questions=questions)
        assert drill_rows(world, 2, 5, questions=questions, weights={}) == rows
        assert with_counterfactuals(world, rows, 2, 0.5, questions=questions, weights={}) == with_counterfactuals(
            world, rows, 2, 0.5, questions=questions)
    plain, weighted = FreshDrills(world, tok, 512, questions=3), FreshDrills(world, tok, 512, questions=3, weights={})
    assert all((a == b).all() for a, b in zip(plain.batch(4, 2), weighted.batch(4, 2), strict=True))


def test_single_question_drills_ask_in_proportion(world):
    w, steps, count = 6.0, 150, 8
    rows = [r for step in range(steps) for r in drill_rows(world, step, count, weights={"birth_date": w})]
    dates, n = _count(rows, "birth_date")
    p = w / (w + len(ALL) - 1)
    assert abs(dates / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    unweighted, _ = _count([r for s in range(steps) for r in drill_rows(world, s, count)], "birth_date")
    assert dates > 2 * unweighted  # and it is not what the drills ask anyway (p = 1/7 there)


@pytest.mark.parametrize("w", [1.0, 5.0, 40.0])
def test_multi_question_drills_draw_pairs_in_proportion(world, w):
    questions, steps, count = 5, 120, 6
    group = world.cfg.num_distractors + 1
    per_drill = []
    for step in range(steps):
        rows = drill_rows(world, step, count, questions=questions, weights={"birth_date": w})
        for row in rows:
            asked = _attributes_asked(row)
            assert len(asked) == questions
            per_drill.append(asked.count("birth_date"))
    expected = _expected_heavy(group, group * (len(ALL) - 1), w, questions)
    mean = sum(per_drill) / len(per_drill)
    var = sum((x - mean) ** 2 for x in per_drill) / (len(per_drill) - 1)
    assert abs(mean - expected) < 4 * math.sqrt(var / len(per_drill)) + 1e-9, (mean, expected)
    assert max(per_drill) <= group  # without replacement: a person's date is asked at most once


def test_counterfactual_drills_change_attributes_in_proportion(world):
    w, steps, count = 4.0, 150, 8
    rows = []
    for step in range(steps):
        fresh = drill_rows(world, step, count, weights={"birth_date": w})
        rows += [r for r in with_counterfactuals(world, fresh, step, 1.0, weights={"birth_date": w})]
    dates, n = _count(rows, "birth_date")
    assert n == steps * count
    p = w / (w + len(ATTRIBUTES) - 1)  # a counterfactual drill changes one of the five biography attributes
    assert abs(dates / n - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("weights, match", [
    ({"birthday": 2.0}, r"unknown attributes \['birthday'\]"),
    ({"birth_date": 0.0}, "birth_date=0.0 must be a finite number > 0"),
    ({"major": -1.0}, "major=-1.0 must be"),
    ({"major": float("nan")}, "major=nan must be"),
    ({"major": "2"}, "major='2' must be"),
])
def test_bad_weights_are_refused(world, weights, match):
    with pytest.raises(ValueError, match=match):
        drill_rows(world, 0, 2, questions=2, weights=weights)
    with pytest.raises(ValueError, match=match):
        DataConfig(source="generator", generator=WORLD_GENERATOR, in_context_fraction=0.5, fresh_drills=2,
                   drill_attribute_weights=weights)


def test_weights_need_fresh_drills():
    with pytest.raises(ValueError, match=r"drill_attribute_weights=\{'birth_date': 3.0\} .*fresh_drills > 0, got 0"):
        DataConfig(source="generator", generator=WORLD_GENERATOR, in_context_fraction=0.5,
                   drill_attribute_weights={"birth_date": 3.0})


def test_a_counterfactual_drill_takes_partial_weights(world):
    import random

    from pure_reasoner.train.world.counterfactual import counterfactual_drill

    rows = [counterfactual_drill(world, random.Random(i), world.people[i % 5], world.fresh_people(f"p{i}", 1),
                                 weights={"major": 50.0}) for i in range(40)]
    assert sum(_attributes_asked(r) == ["major"] for r in rows) > 30  # P = 50 / 54 each

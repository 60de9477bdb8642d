"""Who is in a fresh drill's context (data.drill_distractors): the asked person and that many others, read off the
decoded training sequences; unset, the world's own number, as in its eval splits."""

import re

import pytest

from pure_reasoner.train import data
from pure_reasoner.train.config import WORLD_GENERATOR, DataConfig
from pure_reasoner.train.world.drills import FreshDrills

DATE = re.compile(r"[A-Z][a-z]+ [0-9]{1,2}, [0-9]{4}")


def _biographies_per_context(drills: FreshDrills, key: int) -> list[int]:
    """Per drill packed in micro-batch ``key``'s 2 sequences: the number of biographies before its first ``Q:``,
    counted as the lines stating a birth date (every biography states one; bridge-fact lines state none)."""
    idx_nS, _ = drills.batch(key, 2)
    eod = drills.tok.token_to_id(data.EOD)
    counts = []
    for ids in idx_nS.tolist():
        units, unit = [], []
        for i in ids:
            if i == eod:
                units.append(unit)
                unit = []
            else:
                unit.append(i)
        for u in units:  # whole drills only: the window's last unit may be cut
            text = drills.tok.decode(u)
            if "Q:" in text:
                counts.append(len([line for line in text.split("Q:")[0].split("\n") if DATE.search(line)]))
    return counts


@pytest.mark.parametrize("counterfactual", [0.0, 0.5])
def test_drill_contexts_hold_the_asked_person_and_the_distractors(world, tok, counterfactual):
    assert world.cfg.num_distractors == 1
    for distractors, people in ((None, 2), (0, 1), (2, 3)):
        drills = FreshDrills(world, tok, 1024, questions=2, counterfactual=counterfactual, distractors=distractors)
        counts = _biographies_per_context(drills, 5)
        assert len(counts) >= 2 and set(counts) == {people}, (distractors, counts)
    assert world.cfg.num_distractors == 1  # the world itself is left as it was


@pytest.mark.parametrize("value, match", [
    (-1, "drill_distractors must be null or an int >= 0, got -1"),
    (True, "drill_distractors must be null or an int >= 0, got True"),
])
def test_bad_distractors_are_refused(value, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(source="generator", generator=WORLD_GENERATOR, in_context_fraction=0.5, fresh_drills=2,
                   drill_distractors=value)


def test_distractors_need_fresh_drills():
    with pytest.raises(ValueError, match="drill_distractors=0 .*fresh_drills > 0, got 0"):
        DataConfig(source="generator", generator=WORLD_GENERATOR, in_context_fraction=0.5, drill_distractors=0)

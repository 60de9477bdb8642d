"""Counterfactual reading drills: a known person's biography in context with values changed, and questions whose
answers follow the context, not memory.

``data.counterfactual_drills = p`` (``train.world.drills.FreshDrills``) replaces each fresh reading drill, with
probability p, by a counterfactual drill: its subject is a person of the world drawn uniformly from all known people
(as the ``counterfactual`` eval split draws its subjects), its context that person's biography with
``min(questions, 4)`` attributes given a value other than the memorised one (drawn as the eval split draws it,
``splits.changed_value``) plus the distractors of the drill it replaces (fresh people), and its QA lines ask exactly
the changed attributes, answered with the context's values. One attribute always keeps its memorised value, so the
context is recognisably that person's biography, as in the eval split (which changes one of five). With
``questions=1`` a counterfactual drill has the ``counterfactual`` eval format except that its distractors are fresh
people (unseen people are never trained on).

Drills rather than corpus rows: the corpus is built once per run, so a corpus row would state the same changed value
every epoch (a second fact to memorise, in conflict with the first); a drill draws a new value every micro-batch, so
only reading the context pays. Like every drill the rows carry a context, so none of their tokens is a closed-book or
recall token (``train.data.closed_book_tokens``; fresh drill sequences carry no such marks at all): the changed
values are read, never counted as recalled from memory by ``objective.consult_targets=recall`` or the forget pass.
"""

from __future__ import annotations

import random

from pure_reasoner.train.world import text as wt
from pure_reasoner.train.world.splits import changed_value, context_for, weighted_sample
from pure_reasoner.train.world.text import ATTRIBUTES, attribute_weights
from pure_reasoner.train.world.types import Person, World


def counterfactual_drill(world: World, rng: random.Random, person: Person, distractors: list[Person],
                         questions: int = 1, weights: dict[str, float] | None = None) -> dict:
    """One training row {text, context, kind=drill, spans, recall}: ``person``'s biography with
    ``min(questions, len(ATTRIBUTES) - 1)`` attributes changed (plus ``distractors``' biographies) as context, one
    QA line per changed attribute as text. ``weights`` (``text.attribute_weights``): the attributes changed are
    drawn in proportion to them, without replacement; None: uniformly."""
    if questions < 1:
        raise ValueError(f"drill questions must be >= 1, got {questions}")
    weights = attribute_weights(weights)
    memorised = world.values(person)
    k = min(questions, len(ATTRIBUTES) - 1)
    changed = (rng.sample(ATTRIBUTES, k) if weights is None
               else weighted_sample(rng, list(ATTRIBUTES), weights.__getitem__, k))
    override = {a: changed_value(world, a, memorised[a], rng) for a in changed}
    context = context_for(world, rng, [person, *distractors], override=override)
    text = wt.lines([wt.qa_line(wt.question(a, person.name), override[a], person.name) for a in changed])
    return wt.training_row("drill", text, context)


def with_counterfactuals(world: World, rows: list[dict], step: int | str, share: float, stream: str = "drill",
                         questions: int = 1, weights: dict[str, float] | None = None) -> list[dict]:
    """``rows`` (``drill_rows(world, step, len(rows), stream, questions, weights)``) with each replaced, with
    probability ``share``, by a counterfactual drill (its changed attributes drawn by ``weights``); the rows kept are
    unchanged, and ``share=0`` returns ``rows`` itself.

    Deterministic in (seed, stream, step), like the drills. Drill i's distractors are the fresh people
    ``drill_rows`` drew for it besides its subject, so a call's fresh names stay distinct.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"counterfactual drill share must be in [0, 1], got {share}")
    if share == 0.0:
        return rows
    weights = attribute_weights(weights)
    group = world.cfg.num_distractors + 1
    fresh = world.fresh_people(f"{stream}:{step}", len(rows) * group)
    rng = random.Random(f"{world.cfg.seed}:{stream}:{step}:counterfactual")
    out = []
    for i, row in enumerate(rows):
        if rng.random() < share:
            distractors = fresh[i * group + 1 : (i + 1) * group]
            row = counterfactual_drill(world, rng, rng.choice(world.people), distractors, questions, weights)
        out.append(row)
    return out

"""Question examples about the synthetic world: the evaluation splits and the reading drills.

split                subject                   context                                    asks
closed_book          held-out known person     none                                       one attribute
closed_book_two_hop  held-out known person     none                                       country / employer's city
comparison           two held-out people       none                                       who was born earlier
open_book            unseen person             its bio + distractor bios                  one attribute
open_book_two_hop    unseen person             bios + the bridge facts they need          country / employer's city
counterfactual       known person              its bio, one value changed + distractors   that attribute (gold: context)

Held-out people's biographies are trained, their QA pairs are not (knowledge extraction). Open-book two-hop
contexts state the bridge facts (city -> country, employer -> city) too, so the whole answer is in context
and knowledge-off should not hurt it. Reading drills are open-book examples about freshly generated people.
"""

from __future__ import annotations

import random

import datasets

from pure_reasoner.train.world import text as wt
from pure_reasoner.train.world.text import ATTRIBUTES, TWO_HOP, Builder, attribute_weights
from pure_reasoner.train.world.types import Person, World

SPLITS = ("closed_book", "closed_book_two_hop", "comparison", "open_book", "open_book_two_hop", "counterfactual")
CLOSED_BOOK_SPLITS = ("closed_book", "closed_book_two_hop", "comparison")
OPEN_BOOK_SPLITS = ("open_book", "open_book_two_hop", "counterfactual")
REFERENCE_SEQUENCES = 256  # size of the mean ablations' reference set
BRIDGE_FOR = {"birth_country": ("country",), "employer_city": ("headquarters",)}


def choices_for(world: World, attribute: str, gold: str, rng: random.Random,
                include: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """``num_choices`` distinct values of ``attribute``: gold, ``include`` and uniform distractors, shuffled."""
    options = list(dict.fromkeys((gold, *include)))
    while len(options) < world.cfg.num_choices:
        value = world.random_value(attribute, rng)
        if value not in options:
            options.append(value)
    rng.shuffle(options)
    return options, options.index(gold)


def make_example(split: str, index: int | str, context: Builder, question: Builder, choices: list[str], gold: int,
                 person: str, attribute: str, memorised: str = "") -> dict:
    """One example; spans cover ``prompt + continuation(answer)``."""
    prompt = Builder().extend(context).extend(wt.qa_prompt(question))
    answer = choices[gold]
    spans = prompt.spans + [{"start": len(prompt.text) + 1, "end": len(prompt.text) + 1 + len(answer),
                             "type": "answer", "entity": person}]
    return {"id": f"{split}-{index}", "split": split, "prompt": prompt.text, "context": context.text,
            "question": question.text, "choices": choices, "gold": gold, "answer": answer, "memorised": memorised,
            "person": person, "attribute": attribute, "spans": spans}


def closed_book(world: World, rng: random.Random, split: str, index: int, person: Person, attribute: str) -> dict:
    gold = world.values(person)[attribute]
    options, gold_index = choices_for(world, attribute, gold, rng)
    return make_example(split, index, Builder(), wt.question(attribute, person.name), options, gold_index,
                        person.name, attribute)


def comparison(split: str, index: int, a: Person, b: Person) -> dict:
    """Who of ``a`` and ``b`` (distinct birth dates) was born earlier; choices in question order."""
    gold = 0 if a.birth_date < b.birth_date else 1
    return make_example(split, index, Builder(), wt.comparison_question(a.name, b.name), [a.name, b.name], gold,
                        (a, b)[gold].name, "comparison")


def context_for(world: World, rng: random.Random, people: list[Person], bridges: tuple[str, ...] = (),
                override: dict[str, str] | None = None) -> Builder:
    """Biographies of ``people`` in random order, one per line, then their bridge facts of the given kinds.

    bridges: ``country`` (birth city -> country) and/or ``headquarters`` (employer -> city).
    override: replaces attribute values of ``people[0]`` (counterfactual contexts).
    """
    bios = []
    for i, person in enumerate(people):
        values = {**world.values(person), **(override if i == 0 and override else {})}
        bios.append(wt.biography(person.name, values, rng))
    rng.shuffle(bios)
    facts = {}
    for kind in bridges:
        for person in people:
            if kind == "country":
                facts[person.birth_city] = (kind, world.city_country[person.birth_city])
            else:
                facts[person.employer] = (kind, world.employer_city[person.employer])
    out = Builder()
    for line in bios + [wt.bridge_sentence(kind, s, v, rng) for s, (kind, v) in facts.items()]:
        out.extend(line).add("\n")
    return out


def open_book(world: World, rng: random.Random, split: str, index: int, subject: Person,
              distractors: list[Person], attribute: str) -> dict:
    gold = world.values(subject)[attribute]
    context = context_for(world, rng, [subject, *distractors], BRIDGE_FOR.get(attribute, ()))
    options, gold_index = choices_for(world, attribute, gold, rng)
    return make_example(split, index, context, wt.question(attribute, subject.name), options, gold_index,
                        subject.name, attribute)


def changed_value(world: World, attribute: str, memorised: str, rng: random.Random) -> str:
    """A value of ``attribute`` drawn uniformly from those other than ``memorised`` (a counterfactual's)."""
    stated = memorised
    while stated == memorised:
        stated = world.random_value(attribute, rng)
    return stated


def counterfactual(world: World, rng: random.Random, index: int, person: Person, distractors: list[Person]) -> dict:
    """The context gives ``person`` a new value for one attribute; gold is the context's value."""
    attribute = rng.choice(ATTRIBUTES)
    memorised = world.values(person)[attribute]
    stated = changed_value(world, attribute, memorised, rng)
    context = context_for(world, rng, [person, *distractors], override={attribute: stated})
    options, gold_index = choices_for(world, attribute, stated, rng, include=(memorised,))
    return make_example("counterfactual", index, context, wt.question(attribute, person.name), options, gold_index,
                        person.name, attribute, memorised=memorised)


def _distinct_dates(people: tuple[Person, ...], rng: random.Random) -> tuple[Person, Person]:
    while True:
        a, b = rng.sample(people, 2)
        if a.birth_date != b.birth_date:
            return a, b


def split_examples(world: World, split: str) -> list[dict]:
    """Up to ``cfg.eval_examples`` examples of one split (deterministic in the world's seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    cfg = world.cfg
    rng = random.Random(f"{cfg.seed}:split:{split}")
    n = cfg.eval_examples
    if split in ("closed_book", "closed_book_two_hop"):
        attributes = ATTRIBUTES if split == "closed_book" else TWO_HOP
        pairs = [(p, a) for p in world.heldout_people for a in attributes]
        pairs = rng.sample(pairs, min(n, len(pairs)))
        return [closed_book(world, rng, split, i, p, a) for i, (p, a) in enumerate(pairs)]
    if split == "comparison":
        return [comparison(split, i, *_distinct_dates(world.heldout_people, rng)) for i in range(n)]
    if split == "counterfactual":
        people = rng.sample(world.people, min(n, len(world.people)))
        return [counterfactual(world, rng, i, p, rng.sample(world.unseen, cfg.num_distractors))
                for i, p in enumerate(people)]
    attributes = ATTRIBUTES if split == "open_book" else TWO_HOP
    out = []
    for i in range(n):
        subject, *distractors = rng.sample(world.unseen, cfg.num_distractors + 1)
        out.append(open_book(world, rng, split, i, subject, distractors, rng.choice(attributes)))
    return out


def eval_splits(world: World, splits: tuple[str, ...] = SPLITS) -> datasets.DatasetDict:
    """The evaluation splits as a DatasetDict (split name -> Dataset)."""
    return datasets.DatasetDict({s: datasets.Dataset.from_list(split_examples(world, s)) for s in splits})


def weighted_sample(rng: random.Random, items: list, weight_of, k: int) -> list:
    """``k`` of ``items`` without replacement, each drawn next with probability proportional to ``weight_of(item)``
    among those left (Efraimidis-Spirakis keys ``u ** (1 / w)``, largest first)."""
    keyed = [(rng.random() ** (1.0 / weight_of(item)), i) for i, item in enumerate(items)]
    return [items[i] for _, i in sorted(keyed, reverse=True)[:k]]


def reading_drills(world: World, step: int | str, count: int, stream: str = "drill",
                   weights: dict[str, float] | None = None) -> list[dict]:
    """``count`` open-book examples about people generated fresh for ``step`` (never in the world).

    Deterministic in (seed, stream, step); another step or stream gives other people. Each example has the eval
    schema (``split`` = ``drill``); ``drill_rows`` turns them into training rows. ``weights``
    (``attribute_weights``): the attribute asked is drawn in proportion to them instead of uniformly.
    """
    cfg = world.cfg
    weights = attribute_weights(weights)
    people = world.fresh_people(f"{stream}:{step}", count * (cfg.num_distractors + 1))
    rng = random.Random(f"{cfg.seed}:{stream}:{step}")
    group = cfg.num_distractors + 1
    out = []
    for i in range(count):
        subject, *distractors = people[i * group : (i + 1) * group]
        index = step * count + i if isinstance(step, int) else f"{step}.{i}"
        asked = (rng.choice(ATTRIBUTES + TWO_HOP) if weights is None
                 else rng.choices(ATTRIBUTES + TWO_HOP, weights=[weights[a] for a in ATTRIBUTES + TWO_HOP])[0])
        out.append(open_book(world, rng, "drill", index, subject, distractors, asked))
    return out


def drill_rows(world: World, step: int | str, count: int, stream: str = "drill", questions: int = 1,
               weights: dict[str, float] | None = None) -> list[dict]:
    """Reading drills as training rows {text, context, kind, spans}: context = the biographies (no loss),
    text = the QA lines. Call with the training step to give every batch people never seen before.

    questions: QA lines per drill. 1 is exactly the ``open_book`` / ``open_book_two_hop`` format (one question
    about the subject; bridge facts only where the question needs them). More asks distinct (person, attribute)
    pairs about everyone in the context (subject and distractors) and states the bridge facts the questions
    need: more loss-bearing reading per context token.
    weights: attribute -> weight (``attribute_weights``): questions asked in proportion to them (a multi-question
        drill draws its (person, attribute) pairs without replacement, each next in proportion to its attribute's
        weight). None: uniform, and the drills exactly as without the option.
    """
    if questions < 1:
        raise ValueError(f"drill questions must be >= 1, got {questions}")
    weights = attribute_weights(weights)
    if questions == 1:
        rows = []
        for drill in reading_drills(world, step, count, stream, weights):
            # The drill's spans already index into prompt + continuation == context + text.
            text = drill["prompt"][len(drill["context"]) :] + wt.continuation(drill["answer"])
            rows.append({"text": text, "context": drill["context"], "kind": "drill", "spans": drill["spans"],
                         "recall": wt.recall_spans(drill["spans"]), "keys": wt.key_spans(drill["spans"])})
        return rows
    group = world.cfg.num_distractors + 1
    pairs_available = group * len(ATTRIBUTES + TWO_HOP)
    if questions > pairs_available:
        raise ValueError(f"drill questions={questions} exceeds the {pairs_available} (person, attribute) pairs of "
                         f"a drill's {group} people")
    people = world.fresh_people(f"{stream}:{step}", count * group)
    rng = random.Random(f"{world.cfg.seed}:{stream}:{step}:multi")
    rows = []
    for i in range(count):
        members = people[i * group : (i + 1) * group]
        pairs = [(p, a) for p in members for a in ATTRIBUTES + TWO_HOP]
        asked = (rng.sample(pairs, questions) if weights is None
                 else weighted_sample(rng, pairs, lambda pair: weights[pair[1]], questions))
        bridges = tuple(dict.fromkeys(kind for _, a in asked for kind in BRIDGE_FOR.get(a, ())))
        context = context_for(world, rng, members, bridges)
        text = wt.lines([wt.qa_line(wt.question(a, p.name), world.values(p)[a], p.name) for p, a in asked])
        rows.append(wt.training_row("drill", text, context))
    return rows


def reference_closed_count(world: World, count: int = REFERENCE_SEQUENCES) -> int:
    """How many of ``reference_pairs(world, count)`` are closed-book questions (they come first)."""
    return min(count // 2, len(world.qa_people) * len(ATTRIBUTES + TWO_HOP))


def reference_pairs(world: World, count: int = REFERENCE_SEQUENCES) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs of the mean ablations' reference set (``train.evaluation.mean_reference``),
    deterministic in the world's seed: up to ``count // 2`` closed-book questions (as many as the QA people's facts
    allow), the rest open-book reading drills."""
    if count < 2:
        raise ValueError(f"the reference set needs >= 2 sequences (closed and open book), got {count}")
    rng = random.Random(f"{world.cfg.seed}:mean-reference")
    facts = [(p, a) for p in world.qa_people for a in ATTRIBUTES + TWO_HOP]
    asked = rng.sample(facts, reference_closed_count(world, count))
    closed = [closed_book(world, rng, "reference", i, p, a) for i, (p, a) in enumerate(asked)]
    drills = reading_drills(world, "mean-reference", count - len(closed), stream="reference")
    return [(ex["prompt"], wt.continuation(ex["answer"])) for ex in closed + drills]

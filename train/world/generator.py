"""A synthetic world of people with pseudo-word names, deterministic from a seed, as HuggingFace datasets.

The world (Physics of Language Models 3.1-style, with a two-hop layer on top):
    countries ⊃ cities; employers have a headquarters city; universities; majors.
    people: full name + birth date, birth city, university, major, employer (each drawn uniformly).
    known people: their biographies are in the training text. The first ``qa_fraction`` of them also have
        their QA pairs (and comparisons among them) in training; the rest are *held out*: only their
        questions are asked at evaluation (knowledge extraction, closed book).
    unseen people: never in training; the subjects and distractors of open-book questions.
    fresh people: generated on demand from (seed, step) for reading drills, never equal to a world person.

Training data (``pretraining_corpus``, usable as
``data.generator=pure_reasoner.train.world.generator:pretraining_corpus``) returns a ``datasets.Dataset`` with columns
    text:    the string to train on.
    context: supplied facts ("" = none) that come BEFORE ``text`` and carry NO loss. The pipeline must build
             each row as ``tokens(context) + tokens(text)``, keep the two together in one sequence (never pack a
             row's context and text apart), and set the targets of every position that predicts a context
             token to -100 (``train.objectives.in_context_tokens`` does exactly this). Rows of kind ``drill``
             always have a context; ``bio`` / ``qa`` / ``comparison`` rows get one (another paraphrase of the
             same facts) for ``in_context_fraction`` of rows: the knowledge-in-context objective. With
             ``context_column=False`` the context is merged into ``text`` instead (plain LM on everything).
    kind:    ``bio`` | ``qa`` | ``comparison`` | ``world`` | ``drill``.
    spans:   facts in ``context + text``: list of {start, end, type, entity} (see ``train.world.text``).
    recall:  [start, end] of the spans that hold a fact's value (``world_text.RECALLED_TYPES``): on rows without
             a context, what must be recalled from memory (``objective.consult_targets=recall``).
    keys:    [start, end] of the spans that name what a fact is about (``world_text.KEY_TYPES``: people, the
             cities and companies of bridge facts): where facts are keyed (``objective.consult_targets=recall_keys``).
The corpus holds ``num_drills`` reading drills (fresh people per ``epoch``); for drills that are new in every
batch, ``data.fresh_drills`` (``train.world.drills``) adds ``drill_rows(world, key, count)`` to each micro-batch,
a ``data.counterfactual_drills`` share of them about known people with changed values (``train.world.counterfactual``).
Lengths at the default size: a row with its context is at most ~830 bytes (~400 tokens with a 512-token
byte-level BPE trained on the corpus; drills and open-book prompts ~300), so a training sequence must hold that
much for a context to stay with its text.

Evaluation splits (``eval_splits``), one ``datasets.Dataset`` each, columns: id, split, prompt (context +
``Q: ...\\nA:``), context, question, choices, gold (index into choices), answer, memorised (counterfactual: the
trained value, else ""), person, attribute, spans (over ``prompt + " " + answer + "."``).
``python -m pure_reasoner.train.world --out DIR`` writes the world in the on-disk schema (``docs/world_schema.md``,
``train.world.disk``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import datasets

from pure_reasoner.train.world import text as wt
from pure_reasoner.train.world.splits import SPLITS, context_for, drill_rows, eval_splits, reading_drills
from pure_reasoner.train.world.text import ATTRIBUTES, TWO_HOP, Builder
from pure_reasoner.train.world.types import MAJORS, WORLD_PRESETS, Person, World, WorldConfig, world_config

__all__ = ["SPLITS", "Person", "World", "WorldConfig", "build_world", "drill_rows", "eval_splits",
           "pretraining_corpus", "pretraining_rows", "reading_drills", "world_config"]
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "pl", "st", "tr", "sh", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th")
_UNIVERSITY_FORMS = ("University of {}", "{} University", "{} Institute")
_EMPLOYER_FORMS = ("{} Corp", "{} Labs", "{} Industries", "{} Group", "{} Systems", "{} Works")


class _Words:
    """Unique pronounceable pseudo-words from syllables."""

    def __init__(self, rng: random.Random, taken: set[str]):
        self.rng, self.taken = rng, taken

    def syllables(self, count: int) -> str:
        parts = [self.rng.choice(_ONSETS) + self.rng.choice(_NUCLEI) for _ in range(count)]
        return ("".join(parts) + self.rng.choice(_CODAS)).capitalize()

    def unique(self, min_syllables: int, max_syllables: int) -> str:
        while True:
            word = self.syllables(self.rng.randint(min_syllables, max_syllables))
            if word not in self.taken:
                self.taken.add(word)
                return word


def build_world(cfg: WorldConfig) -> World:
    """Generate the world for ``cfg`` (deterministic: same config, same world)."""
    rng = random.Random(f"{cfg.seed}:world")
    taken: set[str] = set()
    words = _Words(rng, taken)
    city_country = {}
    for _ in range(cfg.num_countries):
        country = words.unique(2, 3)
        for _ in range(cfg.cities_per_country):
            city_country[words.unique(2, 3)] = country
    cities = tuple(city_country)
    universities = tuple(rng.choice(_UNIVERSITY_FORMS).format(words.unique(2, 3)) for _ in range(cfg.num_universities))
    employer_city = {rng.choice(_EMPLOYER_FORMS).format(words.unique(2, 3)): rng.choice(cities)
                     for _ in range(cfg.num_employers)}
    majors = tuple(rng.sample(MAJORS, cfg.num_majors))
    # Shared first and last names (people are told apart by the full name only); ~8x more full names than people
    # so fresh people for reading drills are easy to find.
    pool = 2 * math.ceil(math.sqrt(cfg.num_people + cfg.num_unseen)) + 4
    first_names = tuple(words.unique(1, 2) for _ in range(pool))
    last_names = tuple(words.unique(2, 3) for _ in range(2 * pool))
    draft = World(cfg, city_country, employer_city, universities, majors, first_names, last_names, (), ())
    exclude: set[str] = set()
    people = tuple(draft.new_person(rng, exclude) for _ in range(cfg.num_people))
    unseen = tuple(draft.new_person(rng, exclude) for _ in range(cfg.num_unseen))
    return dataclasses.replace(draft, people=people, unseen=unseen)


def _resolve(world: World | WorldConfig | dict | None, overrides: dict) -> World:
    if isinstance(world, World):
        if overrides:
            raise ValueError(f"cannot override {sorted(overrides)} of an already built World")
        return world
    if isinstance(world, WorldConfig):
        return build_world(dataclasses.replace(world, **overrides))
    return build_world(world_config(**{**(world or {}), **overrides}))


def _known_rows(world: World, rng: random.Random) -> list[tuple[str, Builder, list[Person]]]:
    """(kind, text, people whose facts the text needs) for biographies, QA and comparisons."""
    rows = []
    for person in world.people:
        values = world.values(person)
        rows += [("bio", wt.biography(person.name, values, rng), [person]) for _ in range(world.cfg.bios_per_person)]
    qa_people = world.qa_people
    for person in qa_people:
        values = world.values(person)
        lines = [wt.qa_line(wt.question(a, person.name), values[a], person.name) for a in ATTRIBUTES + TWO_HOP]
        rng.shuffle(lines)
        rows.append(("qa", wt.lines(lines), [person]))
        for _ in range(world.cfg.comparisons_per_person if len(qa_people) > 1 else 0):
            other = rng.choice([p for p in qa_people if p.birth_date != person.birth_date] or [person])
            if other is person:
                continue
            a, b = (person, other) if rng.random() < 0.5 else (other, person)
            earlier = a if a.birth_date < b.birth_date else b
            rows.append(("comparison", wt.qa_line(wt.comparison_question(a.name, b.name), earlier.name, earlier.name),
                         [a, b]))
    return rows


def _world_rows(world: World, rng: random.Random, facts_per_row: int = 8) -> list[Builder]:
    """``bridge_repeats`` paraphrased passes over every bridge fact (city -> country, employer -> city), shuffled
    and cut into rows of ``facts_per_row`` facts (short rows pack like the rest of the corpus)."""
    out = []
    for _ in range(world.cfg.bridge_repeats):
        facts = [wt.bridge_sentence("country", c, k, rng) for c, k in world.city_country.items()]
        facts += [wt.bridge_sentence("headquarters", e, c, rng) for e, c in world.employer_city.items()]
        rng.shuffle(facts)
        out += [wt.lines(facts[i : i + facts_per_row]) for i in range(0, len(facts), facts_per_row)]
    return out


def pretraining_rows(world: World, *, in_context_fraction: float = 0.0, num_drills: int | None = None,
                     drill_questions: int = 1, epoch: int = 0) -> list[dict]:
    """The rows of ``pretraining_corpus(world, ...)`` as a list of dicts (columns text, context, kind, spans,
    recall), shuffled; the arguments as there."""
    if not 0.0 <= in_context_fraction <= 1.0:
        raise ValueError(f"in_context_fraction must be in [0, 1], got {in_context_fraction}")
    if num_drills is not None and num_drills < 0:
        raise ValueError(f"num_drills must be >= 0, got {num_drills}")
    cfg = world.cfg
    rng = random.Random(f"{cfg.seed}:corpus")
    context_rng = random.Random(f"{cfg.seed}:context:{epoch}")
    rows = []
    for kind, text, people in _known_rows(world, rng):
        supplied = context_rng.random() < in_context_fraction
        context = context_for(world, context_rng, people, ("country", "headquarters")) if supplied else None
        rows.append(wt.training_row(kind, text, context))
    rows += [wt.training_row("world", text) for text in _world_rows(world, rng)]
    rows += drill_rows(world, epoch, cfg.num_people if num_drills is None else num_drills, stream="corpus",
                       questions=drill_questions)
    random.Random(f"{cfg.seed}:order:{epoch}").shuffle(rows)
    return rows


def pretraining_corpus(world: World | WorldConfig | dict | None = None, *, in_context_fraction: float = 0.0,
                       num_drills: int | None = None, drill_questions: int = 1, epoch: int = 0,
                       context_column: bool = True, **overrides) -> datasets.Dataset:
    """The training text of a world, shuffled (see the module docstring for the columns and their contract).

    Args:
        world: a World, a WorldConfig, a dict of WorldConfig fields (plus ``preset``), or None for the default;
            ``overrides`` are WorldConfig fields (so Hydra can pass plain values: ``seed=1, num_people=100``).
        in_context_fraction: share of bio / qa / comparison rows whose ``context`` supplies the facts they need
            (another paraphrase of the biographies, plus the bridge facts): the knowledge-in-context objective.
        num_drills: reading-drill rows (open-book QA about fresh people); default ``num_people``.
        drill_questions: QA lines per drill (``drill_rows(questions=)``); also what ``data.fresh_drills`` uses.
        epoch: selects which rows get a context, the drill people and the row order; call once per epoch with a
            new value so drills are never repeated.
        context_column: False merges each context into its text (for pipelines without loss masking).
    """
    rows = pretraining_rows(_resolve(world, overrides), in_context_fraction=in_context_fraction,
                            num_drills=num_drills, drill_questions=drill_questions, epoch=epoch)
    if not context_column:
        rows = [{**{k: v for k, v in r.items() if k != "context"}, "text": r["context"] + r["text"]} for r in rows]
    return datasets.Dataset.from_list(rows)


# Keyword arguments of the corpus functions that are not WorldConfig fields (``update``: a knowledge update's, which
# ``train.world_update.update_corpus`` takes on top of its base world's fields).
CORPUS_ONLY_KWARGS = ("in_context_fraction", "num_drills", "drill_questions", "epoch", "context_column", "update",
                      "replay_in_context_fraction")


def corpus_world_config(world: dict | None = None, **kwargs) -> WorldConfig:
    """The WorldConfig that ``pretraining_corpus(world, **kwargs)`` builds (dict/None ``world`` only)."""
    overrides = {k: v for k, v in kwargs.items() if k not in CORPUS_ONLY_KWARGS}
    return world_config(**{**(world or {}), **overrides})


def save_world_config(cfg: WorldConfig, directory: str | Path) -> Path:
    """Write ``world.json`` (the WorldConfig) into ``directory``; the evaluation reads it from a checkpoint."""
    path = Path(directory) / "world.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return path


def load_world_config(path: str | Path) -> WorldConfig:
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read world config {path}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return world_config(**values)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.world",
                                     description="Write a world directory (docs/world_schema.md): manifest, corpus, "
                                                 "eval splits and the mean ablations' reference set.")
    parser.add_argument("--out", required=True, help="the world directory to write")
    parser.add_argument("--preset", default="default", choices=tuple(WORLD_PRESETS))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="WorldConfig overrides")
    parser.add_argument("--in-context-fraction", type=float, default=0.5,
                        help="share of bio / qa / comparison rows written with their facts as context")
    parser.add_argument("--num-drills", type=int, default=None, help="reading-drill rows in the corpus "
                                                                      "(default: num_people)")
    parser.add_argument("--drill-questions", type=int, default=1, help="QA lines per reading drill")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[key] = json.loads(value) if value[:1].isdigit() or value[:1] == "-" else value
    # Through the importable module: under ``python -m`` this file is ``__main__``, whose World class is not the
    # one ``train.world.disk`` checks against.
    from pure_reasoner.train.world import generator as importable
    from pure_reasoner.train.world.disk import write_world

    try:
        world = importable.build_world(importable.world_config(args.preset, **overrides))
        out = write_world(args.out, world, in_context_fraction=args.in_context_fraction, num_drills=args.num_drills,
                          drill_questions=args.drill_questions)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    print(f"wrote the world directory {out} (manifest.json, corpus.jsonl, eval/ with {len(SPLITS)} splits, "
          "reference.jsonl)")


if __name__ == "__main__":
    main()

"""A synthetic world of people with pseudo-word names, deterministic from a seed, as HuggingFace datasets.

The world (Physics of Language Models 3.1-style, with a two-hop layer on top):
    countries ⊃ cities; employers have a headquarters city; universities; majors.
    people: full name + birth date, birth city, university, major, employer (each drawn uniformly).
    known people: their biographies are in the training text. The first ``qa_fraction`` of them also have
        their QA pairs (and comparisons among them) in training; the rest are *held out*: only their
        questions are asked at evaluation (knowledge extraction, closed book).
    unseen people: never in training; the subjects and distractors of open-book questions.
    fresh people: generated on demand from (seed, step) for reading drills, never equal to a world person.

Training data (``pretraining_corpus``, usable as ``data.generator=train.world:pretraining_corpus``) returns a
``datasets.Dataset`` with columns
    text:    the string to train on.
    context: supplied facts ("" = none) that come BEFORE ``text`` and carry NO loss. The pipeline must build
             each row as ``tokens(context) + tokens(text)``, keep the two together in one sequence (never pack a
             row's context and text apart), and set the targets of every position that predicts a context
             token to -100 (``train.objectives.in_context_tokens`` does exactly this). Rows of kind ``drill``
             always have a context; ``bio`` / ``qa`` / ``comparison`` rows get one (another paraphrase of the
             same facts) for ``in_context_fraction`` of rows: the knowledge-in-context objective. With
             ``context_column=False`` the context is merged into ``text`` instead (plain LM on everything).
    kind:    ``bio`` | ``qa`` | ``comparison`` | ``world`` | ``drill``.
    spans:   facts in ``context + text``: list of {start, end, type, entity} (see ``train.world_text``).
    recall:  [start, end] of the spans that hold a fact's value (``world_text.RECALLED_TYPES``): on rows without
             a context, what must be recalled from memory (``objective.consult_targets=recall``).
The corpus holds ``num_drills`` reading drills (fresh people per ``epoch``); for drills that are new in every
batch, ``data.fresh_drills`` (``train.drills``) adds ``drill_rows(world, key, count)`` to each micro-batch.
Lengths at the default size: a row with its context is at most ~830 bytes (~400 tokens with a 512-token
byte-level BPE trained on the corpus; drills and open-book prompts ~300), so a training sequence must hold that
much for a context to stay with its text.

Evaluation splits (``eval_splits``), one ``datasets.Dataset`` each, columns: id, split, prompt (context +
``Q: ...\\nA:``), context, question, choices, gold (index into choices), answer, memorised (counterfactual: the
trained value, else ""), person, attribute, spans (over ``prompt + " " + answer + "."``).
``python -m train.world --out DIR`` writes the world in the on-disk schema (``docs/world_schema.md``,
``train.world_disk``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from train import world_text as wt
from train.world_splits import SPLITS, context_for, drill_rows, eval_splits, reading_drills
from train.world_text import ATTRIBUTES, TWO_HOP, Builder

__all__ = ["SPLITS", "Person", "World", "WorldConfig", "build_world", "drill_rows", "eval_splits",
           "pretraining_corpus", "reading_drills", "world_config"]
MAJORS = ("Physics", "Chemistry", "History", "Economics", "Biology", "Linguistics", "Mathematics", "Philosophy",
          "Medicine", "Law", "Music", "Architecture", "Geology", "Astronomy", "Sociology", "Psychology",
          "Engineering", "Literature", "Statistics", "Botany", "Anthropology", "Geography", "Theology", "Zoology")
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "pl", "st", "tr", "sh", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th")
_UNIVERSITY_FORMS = ("University of {}", "{} University", "{} Institute")
_EMPLOYER_FORMS = ("{} Corp", "{} Labs", "{} Industries", "{} Group", "{} Systems", "{} Works")


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. Every value set must offer at least ``num_choices`` values."""

    seed: int = 0
    num_people: int = 400
    num_unseen: int = 200
    num_countries: int = 6
    cities_per_country: int = 5
    num_universities: int = 20
    num_majors: int = 16
    num_employers: int = 24
    first_year: int = 1900
    num_years: int = 100
    bios_per_person: int = 5
    qa_fraction: float = 0.5
    comparisons_per_person: int = 2
    bridge_repeats: int = 5
    num_distractors: int = 1
    num_choices: int = 4
    eval_examples: int = 200

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("seed", "qa_fraction", "first_year", "comparisons_per_person", "num_distractors") \
                    and value <= 0:
                raise ValueError(f"world.{f.name} must be > 0, got {value}")
        if self.comparisons_per_person < 0 or self.num_distractors < 0:
            raise ValueError(f"world.comparisons_per_person / num_distractors must be >= 0, got "
                             f"{self.comparisons_per_person} / {self.num_distractors}")
        num_qa = round(self.qa_fraction * self.num_people)
        if not 1 <= num_qa <= self.num_people - 2:
            raise ValueError(f"world.qa_fraction={self.qa_fraction} leaves {num_qa} QA people of {self.num_people}; "
                             "need >= 1 with QA and >= 2 held out")
        if self.num_majors > len(MAJORS):
            raise ValueError(f"world.num_majors must be <= {len(MAJORS)}, got {self.num_majors}")
        if self.num_unseen < self.num_distractors + 1:
            raise ValueError(f"world.num_unseen={self.num_unseen} must exceed num_distractors={self.num_distractors}")
        if self.num_choices < 2:
            raise ValueError(f"world.num_choices must be >= 2, got {self.num_choices}")
        sizes = dict(num_countries=self.num_countries, num_universities=self.num_universities,
                     num_majors=self.num_majors, num_employers=self.num_employers,
                     cities=self.num_countries * self.cities_per_country)
        for name, size in sizes.items():
            if size < self.num_choices:
                raise ValueError(f"world.{name}={size} is below num_choices={self.num_choices}")

    @property
    def num_qa_people(self) -> int:
        return round(self.qa_fraction * self.num_people)


WORLD_PRESETS = {
    "default": WorldConfig(),
    "tiny": WorldConfig(num_people=24, num_unseen=12, num_countries=4, cities_per_country=2, num_universities=6,
                        num_majors=6, num_employers=6, num_years=10, bios_per_person=2, bridge_repeats=2,
                        eval_examples=16),
}


def world_config(preset: str = "default", **overrides) -> WorldConfig:
    """A named preset with field overrides (unknown fields raise ValueError)."""
    if preset not in WORLD_PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose from {tuple(WORLD_PRESETS)}")
    names = {f.name for f in dataclasses.fields(WorldConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown WorldConfig fields: {sorted(unknown)}")
    return dataclasses.replace(WORLD_PRESETS[preset], **overrides)


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: tuple[int, int, int]  # (year, month, day)
    birth_city: str
    university: str
    major: str
    employer: str


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


@dataclass(frozen=True)
class World:
    cfg: WorldConfig
    city_country: dict[str, str]
    employer_city: dict[str, str]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    people: tuple[Person, ...]  # known; people[:cfg.num_qa_people] have QA pairs in training
    unseen: tuple[Person, ...]  # never in training

    @property
    def qa_people(self) -> tuple[Person, ...]:
        return self.people[: self.cfg.num_qa_people]

    @property
    def heldout_people(self) -> tuple[Person, ...]:
        return self.people[self.cfg.num_qa_people :]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.people + self.unseen)

    def value_space(self, attribute: str) -> tuple[str, ...] | None:
        """All values of an attribute (None for birth_date: too many to list; see ``num_values``)."""
        cities, countries = tuple(self.city_country), tuple(dict.fromkeys(self.city_country.values()))
        spaces = {"birth_city": cities, "university": self.universities, "major": self.majors,
                  "employer": tuple(self.employer_city), "birth_country": countries, "employer_city": cities}
        if attribute == "birth_date":
            return None
        if attribute not in spaces:
            raise ValueError(f"unknown attribute {attribute!r}")
        return spaces[attribute]

    def num_values(self, attribute: str) -> int:
        """Number of equally likely values the generator draws ``attribute`` from."""
        space = self.value_space(attribute)
        return 12 * 28 * self.cfg.num_years if space is None else len(space)

    def random_value(self, attribute: str, rng: random.Random) -> str:
        space = self.value_space(attribute)
        if space is None:
            return wt.format_date(*self.random_date(rng))
        return rng.choice(space)

    def random_date(self, rng: random.Random) -> tuple[int, int, int]:
        # Days 1..28 so every (month, day) pair is valid and the value space is uniform.
        return self.cfg.first_year + rng.randrange(self.cfg.num_years), rng.randint(1, 12), rng.randint(1, 28)

    def values(self, person: Person) -> dict[str, str]:
        """Attribute -> value string, for ATTRIBUTES and the two-hop attributes."""
        return {"birth_date": wt.format_date(*person.birth_date), "birth_city": person.birth_city,
                "university": person.university, "major": person.major, "employer": person.employer,
                "birth_country": self.city_country[person.birth_city],
                "employer_city": self.employer_city[person.employer]}

    def new_person(self, rng: random.Random, exclude: set[str]) -> Person:
        """A person with a full name not in ``exclude`` (which it is added to); attributes uniform.

        Raises ValueError when every full name of the world's name pool is taken (the pool grows with
        ``num_people + num_unseen``; reading drills draw from it too).
        """
        if len(exclude) >= len(self.first_names) * len(self.last_names):
            raise ValueError(
                f"the world's {len(self.first_names)} x {len(self.last_names)} full names are all taken: ask for "
                f"fewer reading drills or fresh people, or a bigger world (num_people + num_unseen)"
            )
        while True:
            name = f"{rng.choice(self.first_names)} {rng.choice(self.last_names)}"
            if name not in exclude:
                exclude.add(name)
                break
        return Person(name, self.random_date(rng), rng.choice(tuple(self.city_country)), rng.choice(self.universities),
                      rng.choice(self.majors), rng.choice(tuple(self.employer_city)))

    def fresh_people(self, step: int | str, count: int) -> list[Person]:
        """``count`` people never in the world (neither known nor unseen), deterministic in (seed, step)."""
        rng = random.Random(f"{self.cfg.seed}:fresh:{step}")
        exclude = set(self.names)
        return [self.new_person(rng, exclude) for _ in range(count)]


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
    if not 0.0 <= in_context_fraction <= 1.0:
        raise ValueError(f"in_context_fraction must be in [0, 1], got {in_context_fraction}")
    if num_drills is not None and num_drills < 0:
        raise ValueError(f"num_drills must be >= 0, got {num_drills}")
    world = _resolve(world, overrides)
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
    if not context_column:
        rows = [{"text": r["context"] + r["text"], "kind": r["kind"], "spans": r["spans"], "recall": r["recall"]}
                for r in rows]
    return datasets.Dataset.from_list(rows)


CORPUS_ONLY_KWARGS = ("in_context_fraction", "num_drills", "drill_questions", "epoch", "context_column")


def corpus_world_config(world: dict | None = None, **kwargs) -> WorldConfig:
    """The WorldConfig that ``pretraining_corpus(world, **kwargs)`` builds (dict/None ``world`` only)."""
    overrides = {k: v for k, v in kwargs.items() if k not in CORPUS_ONLY_KWARGS}
    return world_config(**{**(world or {}), **overrides})


def save_world_config(cfg: WorldConfig, directory: str | Path) -> Path:
    """Write ``world.json`` (the WorldConfig) into ``directory``; ``train.eval`` reads it from a checkpoint."""
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
    parser = argparse.ArgumentParser(prog="python -m train.world",
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
    # one ``train.world_disk`` checks against.
    from train import world as importable
    from train.world_disk import write_world

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

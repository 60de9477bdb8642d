"""The world's types: its sizes (``WorldConfig`` and presets), a ``Person`` and the ``World`` itself.

Shared by the generator (``generator``), the question splits (``splits``), the on-disk schema (``disk``) and the
evaluation, so none of them imports another for its types.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from pure_reasoner.train.world import text as wt

MAJORS = ("Physics", "Chemistry", "History", "Economics", "Biology", "Linguistics", "Mathematics", "Philosophy",
          "Medicine", "Law", "Music", "Architecture", "Geology", "Astronomy", "Sociology", "Psychology",
          "Engineering", "Literature", "Statistics", "Botany", "Anthropology", "Geography", "Theology", "Zoology")

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

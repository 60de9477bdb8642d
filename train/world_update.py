"""A knowledge update of a trained world: new people and changed facts, their training rows and their questions.

An update is a deterministic function of (the trained world's WorldConfig, ``UpdateConfig``):
    new people:     ``new_people`` people never in the world (``World.fresh_people``, so neither known nor unseen),
                    attributes drawn as for any person. As in pretraining, the first ``qa_fraction`` of them
                    (the base world's share) also have their QA pairs and comparisons in the update's rows; the
                    rest are held out: only their biographies are trained and their questions are asked
                    (knowledge extraction, closed book), so new facts are measured as pretraining facts are.
    changed facts:  for ``changed_facts`` held-out known people (biographies trained, QA never), one attribute
                    (of ``world_text.ATTRIBUTES``) gets a new value, different from the old one. The update restates
                    each changed fact ``bios_per_person`` times (one biography sentence per restatement, paraphrased).
    replay:         ``round(replay * R)`` rows of the base world's own pretraining corpus (R: the update's own rows),
                    shuffled in with them (rehearsal of the old facts; none by default). Never a row about a person
                    with a changed fact (it would state the old value) or about a new person.

``update_corpus`` (``data.generator=pure_reasoner.train.world_update:update_corpus``,
``train.config.UPDATE_GENERATOR``) gives the rows in ``train.world.pretraining_corpus``'s schema (text, context, kind,
spans, recall): so the recall objectives (consult targets, the anchor, the forget pass) see the new values marked as
pretraining facts are. A column ``anchor`` marks the replayed rows: ``objective.anchor_rows=marked`` anchors only
those to the base model (old facts kept where they are rehearsed) and leaves the new values free to move. Its
kwargs are the base world's (a preset and WorldConfig fields, as ``pretraining_corpus`` takes them) plus
``update``: a dict of ``UpdateConfig`` fields. ``update_splits`` gives the questions ``train.update_eval`` scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import datasets

from pure_reasoner.train.world import text as wt
from pure_reasoner.train.world.generator import (
    CORPUS_ONLY_KWARGS,
    Person,
    World,
    WorldConfig,
    _known_rows,
    build_world,
    pretraining_rows,
    world_config,
)
from pure_reasoner.train.world.splits import choices_for, context_for, drill_rows, make_example, split_examples
from pure_reasoner.train.world.text import ATTRIBUTES, BIO_TEMPLATES

UPDATE_FILE = "update.json"  # a run's (and its export's) UpdateConfig; world.json holds the base world
# Questions about the update: split -> what it asks. Retention and reading use the base world's splits.
NEW_SPLITS = {"new_people": "closed_book", "new_people_two_hop": "closed_book_two_hop"}
CHANGED_SPLIT = "changed"
RETAINED_SPLITS = ("closed_book", "closed_book_two_hop")
READING_SPLITS = ("open_book", "open_book_two_hop", "counterfactual")
UPDATE_SPLITS = (*NEW_SPLITS, CHANGED_SPLIT, *RETAINED_SPLITS, *READING_SPLITS)
RESTATEMENTS_PER_ROW = 8  # changed facts per restatement row (short rows pack like the rest of the corpus)


@dataclass(frozen=True)
class UpdateConfig:
    """What an update teaches: ``new_people`` new people and ``changed_facts`` changed facts, drawn with ``seed``;
    ``replay``: replayed pretraining rows per row of the update (0: none)."""

    seed: int = 1
    new_people: int = 40
    changed_facts: int = 20
    replay: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.replay, bool) or not isinstance(self.replay, int | float) or \
                not math.isfinite(self.replay) or self.replay < 0:
            raise ValueError(f"update.replay must be a finite number >= 0, got {self.replay!r}")
        if self.new_people < 0 or self.changed_facts < 0:
            raise ValueError(f"update.new_people / changed_facts must be >= 0, got {self.new_people} / "
                             f"{self.changed_facts}")
        if self.new_people == 0 and self.changed_facts == 0:
            raise ValueError("an update needs new_people > 0 or changed_facts > 0, got 0 and 0")


@dataclass(frozen=True)
class ChangedFact:
    person: Person  # as the base world has them (old value)
    attribute: str
    old: str
    new: str


@dataclass(frozen=True)
class WorldUpdate:
    cfg: UpdateConfig
    world: World  # the base world, unchanged
    new_people: tuple[Person, ...]
    changed: tuple[ChangedFact, ...]

    @property
    def new_world(self) -> World | None:
        """The base world with the new people as its known people (QA ones first, the base ``qa_fraction``), so
        the pretraining rows and closed-book splits apply to them; None without new people."""
        if not self.new_people:
            return None
        cfg = dataclasses.replace(self.world.cfg, num_people=len(self.new_people))
        return dataclasses.replace(self.world, cfg=cfg, people=self.new_people)

    @property
    def changed_names(self) -> frozenset[str]:
        return frozenset(c.person.name for c in self.changed)


def build_update(world: World, cfg: UpdateConfig) -> WorldUpdate:
    """The update ``cfg`` of ``world`` (deterministic: same world and config, same update).

    Raises ValueError when the world has fewer held-out people than ``changed_facts``, when the new people leave no
    QA or no held-out person at the base ``qa_fraction``, or when the name pool is exhausted.
    """
    heldout = world.heldout_people
    if cfg.changed_facts > len(heldout):
        raise ValueError(f"update.changed_facts={cfg.changed_facts} exceeds the world's {len(heldout)} held-out "
                         "people (changed facts are about people whose QA pairs were never trained)")
    if cfg.new_people:
        try:
            dataclasses.replace(world.cfg, num_people=cfg.new_people)
        except ValueError as err:
            raise ValueError(f"update.new_people={cfg.new_people} is too few at qa_fraction={world.cfg.qa_fraction}: "
                             f"{err}") from err
    new_people = tuple(world.fresh_people(f"update:{cfg.seed}", cfg.new_people))
    rng = random.Random(f"{world.cfg.seed}:update:{cfg.seed}")
    changed = []
    for person in rng.sample(heldout, cfg.changed_facts):
        attribute = rng.choice(ATTRIBUTES)
        old = new = world.values(person)[attribute]
        while new == old:
            new = world.random_value(attribute, rng)
        changed.append(ChangedFact(person, attribute, old, new))
    return WorldUpdate(cfg, world, new_people, tuple(changed))


def update_config(values: dict | UpdateConfig | None, where: str = "update") -> UpdateConfig:
    """An UpdateConfig from its fields (None: the defaults). Raises ValueError naming ``where`` on unknown fields."""
    if isinstance(values, UpdateConfig):
        return values
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"{where} must be a dict of UpdateConfig fields, got {type(values).__name__}")
    try:
        return UpdateConfig(**(values or {}))
    except TypeError as err:
        raise ValueError(f"{where}: {err}; fields: {[f.name for f in dataclasses.fields(UpdateConfig)]}") from err


def _resolve(world: dict | None, update: dict | UpdateConfig | None, overrides: dict) -> WorldUpdate:
    return build_update(build_world(world_config(**{**(world or {}), **overrides})), update_config(update))


def restatement_rows(update: WorldUpdate, rng: random.Random) -> list[wt.Builder]:
    """``bios_per_person`` passes over the changed facts, one paraphrased biography sentence per fact with its new
    value, shuffled and cut into rows of ``RESTATEMENTS_PER_ROW`` facts."""
    out = []
    for _ in range(update.world.cfg.bios_per_person if update.changed else 0):
        facts = [wt.fill(rng.choice(BIO_TEMPLATES[c.attribute]), "name", c.person.name, c.attribute, c.new,
                         c.person.name) for c in update.changed]
        rng.shuffle(facts)
        out += [wt.lines(facts[i : i + RESTATEMENTS_PER_ROW]) for i in range(0, len(facts), RESTATEMENTS_PER_ROW)]
    return out


def replay_rows(update: WorldUpdate, count: int, *, in_context_fraction: float = 0.0, epoch: int = 0) -> list[dict]:
    """``count`` rows of the base world's pretraining corpus (``pretraining_rows`` without reading drills:
    biographies, QA lines, comparisons and bridge facts as pretraining writes them, recall marks included), drawn
    with the update's seed: passes over the pool in a seeded order, the last one cut short.

    The pool leaves out every row with a span about a person whose fact the update changes (it would state the old
    value) or about a new person. Raises ValueError when ``count`` > 0 and the pool is empty.
    """
    if count <= 0:
        return []
    excluded = update.changed_names | {p.name for p in update.new_people}
    pool = [row for row in pretraining_rows(update.world, in_context_fraction=in_context_fraction, num_drills=0,
                                            epoch=epoch)
            if not any(span["entity"] in excluded for span in row["spans"])]
    if not pool:
        raise ValueError(f"update.replay={update.cfg.replay}: no pretraining row is left to replay")
    rng = random.Random(f"{update.world.cfg.seed}:update-replay:{update.cfg.seed}:{epoch}")
    out: list[dict] = []
    while len(out) < count:
        out += rng.sample(pool, min(len(pool), count - len(out)))
    return out


def update_rows(update: WorldUpdate, *, in_context_fraction: float = 0.0, num_drills: int = 0,
                drill_questions: int = 1, epoch: int = 0, anchor_column: bool = False,
                replay_in_context_fraction: float | None = None) -> list[dict]:
    """The update's training rows, shuffled (``pretraining_corpus``'s schema; kinds bio / qa / comparison / drill,
    and ``world`` among the replayed rows; with ``anchor_column`` also ``anchor``: True on the replayed rows only,
    the rows ``objective.anchor_rows=marked`` anchors to the base model).

    New people: biographies, QA lines and comparisons exactly as pretraining writes them for known people (a share
    ``in_context_fraction`` with their facts as context). Changed facts: restatement rows (kind ``bio``, never a
    context). ``num_drills`` reading drills about people in neither the world nor the update (none by default:
    the update teaches facts; drills would also train reading). Replay: ``round(update.cfg.replay * R)`` rows of
    ``replay_rows`` (R: the rows above; a share ``replay_in_context_fraction`` with a context, as pretraining has
    them; None: ``in_context_fraction``), so replayed rows may carry their facts in context while the update's own
    rows do not.
    """
    if replay_in_context_fraction is None:
        replay_in_context_fraction = in_context_fraction
    for name, value in (("in_context_fraction", in_context_fraction),
                        ("replay_in_context_fraction", replay_in_context_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if num_drills < 0:
        raise ValueError(f"num_drills must be >= 0, got {num_drills}")
    seed, key = update.world.cfg.seed, update.cfg.seed
    rng = random.Random(f"{seed}:update-corpus:{key}")
    context_rng = random.Random(f"{seed}:update-context:{key}:{epoch}")
    rows = []
    if update.new_world is not None:
        for kind, text, people in _known_rows(update.new_world, rng):
            supplied = context_rng.random() < in_context_fraction
            context = context_for(update.world, context_rng, people, ("country", "headquarters")) if supplied else None
            rows.append(wt.training_row(kind, text, context))
    rows += [wt.training_row("bio", text) for text in restatement_rows(update, rng)]
    # Drill people must be neither known, unseen nor new: the world's exclusion list, with the new people added.
    guard = dataclasses.replace(update.world, unseen=update.world.unseen + update.new_people)
    rows += drill_rows(guard, f"update:{key}:{epoch}", num_drills, stream="update", questions=drill_questions)
    replayed = replay_rows(update, round(update.cfg.replay * len(rows)),
                           in_context_fraction=replay_in_context_fraction, epoch=epoch)
    if anchor_column:
        rows, replayed = [{**r, "anchor": False} for r in rows], [{**r, "anchor": True} for r in replayed]
    rows += replayed
    random.Random(f"{seed}:update-order:{key}:{epoch}").shuffle(rows)
    return rows


def update_corpus(world: dict | None = None, *, update: dict | UpdateConfig | None = None,
                  in_context_fraction: float = 0.0, num_drills: int = 0, drill_questions: int = 1, epoch: int = 0,
                  context_column: bool = True, replay_in_context_fraction: float | None = None,
                  **overrides) -> datasets.Dataset:
    """The training rows of an update as a ``datasets.Dataset``
    (``data.generator=pure_reasoner.train.world_update:update_corpus``).

    Args:
        world, overrides: the base world as ``pretraining_corpus`` takes it (a dict of WorldConfig fields plus
            ``preset``, and/or the fields as keyword arguments).
        update: ``UpdateConfig`` fields (seed, new_people, changed_facts, replay) or an UpdateConfig.
        in_context_fraction, num_drills, drill_questions, epoch, replay_in_context_fraction: see ``update_rows``
            (``data.generator_kwargs.replay_in_context_fraction`` sets the last).
        context_column: False merges each context into its text (for pipelines without loss masking).
    The rows carry ``update_rows``'s ``anchor`` column.
    """
    rows = update_rows(_resolve(world, update, overrides), in_context_fraction=in_context_fraction,
                       num_drills=num_drills, drill_questions=drill_questions, epoch=epoch, anchor_column=True,
                       replay_in_context_fraction=replay_in_context_fraction)
    if not context_column:
        rows = [{**{k: v for k, v in r.items() if k != "context"}, "text": r["context"] + r["text"]} for r in rows]
    return datasets.Dataset.from_list(rows)


def _changed_example(update: WorldUpdate, rng: random.Random, index: int, fact: ChangedFact) -> dict:
    """Closed book: the changed attribute; gold is the new value, the old one is among the choices (``memorised``)."""
    choices, gold = choices_for(update.world, fact.attribute, fact.new, rng, include=(fact.old,))
    return make_example(CHANGED_SPLIT, index, wt.Builder(), wt.question(fact.attribute, fact.person.name), choices,
                        gold, fact.person.name, fact.attribute, memorised=fact.old)


def update_splits(update: WorldUpdate) -> dict[str, list[dict]]:
    """Questions about an update (``train.world_splits`` example schema), split -> examples (``UPDATE_SPLITS``).

    new_people[_two_hop]: the held-out new people's facts, closed book. changed: every changed fact, closed book.
    closed_book[_two_hop] (retention), open_book[_two_hop] and counterfactual (reading): the base world's splits
    without the examples about a person with a changed fact (their old answers are no longer right, or no longer
    what is memorised). Splits that come out empty are left out.
    """
    out = {}
    if update.new_world is not None:
        for name, split in NEW_SPLITS.items():
            out[name] = [{**ex, "split": name, "id": f"{name}-{i}"}
                         for i, ex in enumerate(split_examples(update.new_world, split))]
    rng = random.Random(f"{update.world.cfg.seed}:update-split:{update.cfg.seed}")
    out[CHANGED_SPLIT] = [_changed_example(update, rng, i, fact) for i, fact in enumerate(update.changed)]
    changed = update.changed_names
    for split in (*RETAINED_SPLITS, *READING_SPLITS):
        out[split] = [ex for ex in split_examples(update.world, split) if ex["person"] not in changed]
    return {name: examples for name, examples in out.items() if examples}


def update_kwargs(world_cfg: WorldConfig, update: UpdateConfig) -> dict:
    """``data.generator_kwargs`` that make ``update_corpus`` the rows of ``update`` to ``world_cfg``."""
    return {**dataclasses.asdict(world_cfg), "update": dataclasses.asdict(update)}


def save_update_files(generator_kwargs: dict, directory: str | Path) -> None:
    """Write ``world.json`` (the base world) and ``update.json`` (the UpdateConfig) of a run's
    ``data.generator_kwargs`` into ``directory`` (``train.update_eval`` reads them from an export)."""
    from pure_reasoner.train.world.generator import save_world_config

    kwargs = dict(generator_kwargs)
    update = kwargs.pop("update", None)
    for name in CORPUS_ONLY_KWARGS:
        kwargs.pop(name, None)
    resolved = _resolve(kwargs, update, {})
    save_world_config(resolved.world.cfg, directory)
    (Path(directory) / UPDATE_FILE).write_text(json.dumps(dataclasses.asdict(resolved.cfg), indent=2))


def load_update(directory: str | Path) -> WorldUpdate:
    """The update a run or export in ``directory`` was trained on (its ``world.json`` and ``update.json``)."""
    from pure_reasoner.train.world.generator import load_world_config

    path = Path(directory) / UPDATE_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the update of {directory}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    world = build_world(load_world_config(Path(directory) / "world.json"))
    return build_update(world, update_config(values, str(path)))

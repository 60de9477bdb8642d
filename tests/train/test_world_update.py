"""The update world (train.world_update): deterministic, new people disjoint from the world, changed facts really
changed, rows that state (and mark for recall) exactly the update's facts, and questions about them."""

import dataclasses
import hashlib
import json
from collections import Counter

import pytest

from pure_reasoner.train.world.generator import build_world, pretraining_corpus, world_config
from pure_reasoner.train.world.text import ATTRIBUTES, KEY_TYPES, TWO_HOP
from pure_reasoner.train.world_update import (
    CHANGED_SPLIT,
    READING_SPLITS,
    RETAINED_SPLITS,
    UpdateConfig,
    build_update,
    load_update,
    save_update_files,
    update_corpus,
    update_kwargs,
    update_rows,
    update_splits,
)

WORLD = build_world(world_config("tiny"))
CFG = UpdateConfig(seed=3, new_people=8, changed_facts=5)


def test_same_inputs_same_update_and_another_seed_another_one():
    a, b = build_update(WORLD, CFG), build_update(build_world(world_config("tiny")), CFG)
    assert a.new_people == b.new_people and a.changed == b.changed
    assert update_rows(a, num_drills=2) == update_rows(b, num_drills=2)
    other = build_update(WORLD, dataclasses.replace(CFG, seed=4))
    assert {p.name for p in other.new_people} != {p.name for p in a.new_people}


def test_new_people_are_not_in_the_world_and_changed_facts_change():
    update = build_update(WORLD, CFG)
    world_names = {p.name for p in WORLD.people} | {p.name for p in WORLD.unseen}
    new_names = [p.name for p in update.new_people]
    assert len(set(new_names)) == CFG.new_people and not set(new_names) & world_names
    heldout = {p.name for p in WORLD.people[WORLD.cfg.num_qa_people :]}
    assert len({c.person.name for c in update.changed}) == CFG.changed_facts
    for fact in update.changed:
        assert fact.person.name in heldout  # QA never trained: asked as held-out facts are
        assert fact.attribute in ATTRIBUTES
        assert fact.old == WORLD.values(fact.person)[fact.attribute] != fact.new
        assert fact.new in (WORLD.value_space(fact.attribute) or (fact.new,))


def _recalled(row: dict) -> list[str]:
    full = row["context"] + row["text"]
    return [full[start:end] for start, end in row["recall"]]


def test_rows_state_the_new_people_and_the_new_values_marked_for_recall():
    update = build_update(WORLD, CFG)
    rows = update_rows(update, num_drills=3)
    bios_per_person = WORLD.cfg.bios_per_person
    num_qa = round(WORLD.cfg.qa_fraction * CFG.new_people)
    for i, person in enumerate(update.new_people):
        bios = [r for r in rows if r["kind"] == "bio" and person.name in r["text"] and "\n" not in r["text"]]
        assert len(bios) == bios_per_person
        for bio in bios:  # every value of the person is in the biography and marked for recall
            assert set(WORLD.values(person)[a] for a in ATTRIBUTES) <= set(_recalled(bio))
        qa = [r for r in rows if r["kind"] == "qa" and person.name in r["text"]]
        assert len(qa) == (1 if i < num_qa else 0)  # held-out new people: biographies only
        if qa:
            assert set(WORLD.values(person)[a] for a in ATTRIBUTES + TWO_HOP) <= set(_recalled(qa[0]))
    restated = [line for r in rows if r["kind"] == "bio" and "\n" in r["text"] for line in r["text"].split("\n")]
    for fact in update.changed:
        mine = [line for line in restated if line.startswith(fact.person.name) or f" {fact.person.name} " in line]
        assert len(mine) == bios_per_person
        assert all(line.endswith(f"{fact.new}.") and fact.old not in line for line in mine)
    assert all(r["context"] == "" for r in rows if r["kind"] != "drill")  # in_context_fraction=0: memorise all
    drills = [r for r in rows if r["kind"] == "drill"]
    assert len(drills) == 3
    everyone = {p.name for p in WORLD.people + WORLD.unseen + update.new_people}
    for drill in drills:
        named = {s["entity"] for s in drill["spans"] if s["type"] == "name"}
        assert named and not named & everyone


def test_splits_ask_the_update_and_leave_changed_people_out_of_the_old_ones():
    update = build_update(WORLD, CFG)
    splits = update_splits(update)
    values = {p.name: WORLD.values(p) for p in update.new_people}
    num_qa = round(WORLD.cfg.qa_fraction * CFG.new_people)
    heldout_new = {p.name for p in update.new_people[num_qa:]}
    for split in ("new_people", "new_people_two_hop"):
        assert splits[split]
        for ex in splits[split]:
            assert ex["person"] in heldout_new and ex["answer"] == values[ex["person"]][ex["attribute"]]
    assert len(splits[CHANGED_SPLIT]) == CFG.changed_facts
    for ex, fact in zip(splits[CHANGED_SPLIT], update.changed, strict=True):
        assert (ex["person"], ex["attribute"], ex["answer"], ex["memorised"]) == \
            (fact.person.name, fact.attribute, fact.new, fact.old)
        assert fact.old in ex["choices"] and ex["choices"][ex["gold"]] == fact.new
    for split in (*RETAINED_SPLITS, *READING_SPLITS):
        assert splits[split] and not {ex["person"] for ex in splits[split]} & update.changed_names


def test_corpus_kwargs_and_update_files_round_trip(tmp_path):
    kwargs = update_kwargs(WORLD.cfg, CFG)
    rows = update_corpus(**kwargs).to_list()
    assert sorted(r["text"] for r in rows) == sorted(r["text"] for r in update_rows(build_update(WORLD, CFG)))
    save_update_files({**kwargs, "num_drills": 0, "drill_questions": 5}, tmp_path)  # corpus-only kwargs ignored
    loaded = load_update(tmp_path)
    assert loaded.world.cfg == WORLD.cfg and loaded.cfg == CFG


@pytest.mark.parametrize("fields, message", [
    ({"changed_facts": 13}, "changed_facts=13 exceeds the world's 12 held-out"),
    ({"new_people": 2, "changed_facts": 2}, "new_people=2 is too few"),
    ({"new_people": -1}, "must be >= 0"),
    ({"new_people": 0, "changed_facts": 0}, "needs new_people > 0 or changed_facts > 0"),
    ({"people": 3, "changed_facts": 2}, "unexpected keyword"),
    ({"replay": -0.5}, r"replay must be a finite number >= 0, got -0.5"),
    ({"replay": float("nan")}, r"replay must be a finite number >= 0, got nan"),
    ({"replay": float("inf")}, r"replay must be a finite number >= 0, got inf"),
    ({"replay": "1"}, r"replay must be a finite number >= 0, got '1'"),
])
def test_bad_updates_name_the_value(fields, message):
    with pytest.raises(ValueError, match=message):
        update_corpus(preset="tiny", update=fields)


def test_an_update_of_changed_facts_only():
    update = build_update(WORLD, UpdateConfig(seed=1, new_people=0, changed_facts=2))
    assert update.new_world is None and "new_people" not in update_splits(update)
    assert all(r["kind"] == "bio" for r in update_rows(update))


def _digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


@pytest.mark.parametrize("kwargs, count, digest", [
    ({}, 30, "0c65b5e583939b10d67d802ed57946bb42b6cb3db8636db6c0b99a4d2e63ab76"),
    ({"in_context_fraction": 0.5, "num_drills": 2, "epoch": 1}, 32,
     "461edef4708491b334f4c73d94547ab71e12ac161736baca84452fe9c18f3e2d"),
])
def test_no_replay_is_the_corpus_the_measured_updates_trained_on(kwargs, count, digest):
    # The digests are of the rows written before replay existed (same world, update and arguments), and before
    # the rows carried ``keys`` (the spans' key types, which the digested spans already hold).
    rows = update_rows(build_update(WORLD, dataclasses.replace(CFG, replay=0.0)), **kwargs)
    assert all(r["keys"] == [[s["start"], s["end"]] for s in r["spans"] if s["type"] in KEY_TYPES] for r in rows)
    assert (len(rows), _digest([{k: v for k, v in r.items() if k != "keys"} for r in rows])) == (count, digest)


# The eligible pool, worked out from the text: pretraining rows without drills that name no changed or new person.
PRETRAINING = pretraining_corpus(WORLD.cfg, num_drills=0).to_list()


def _eligible(update) -> list[dict]:
    names = update.changed_names | {p.name for p in update.new_people}
    return [r for r in PRETRAINING if not any(n in r["context"] + r["text"] for n in names)]


@pytest.mark.parametrize("replay", [0.5, 1.0, 2.5, 7.0])
def test_replay_adds_rows_of_the_pretraining_corpus_about_unchanged_people(replay):
    update = build_update(WORLD, dataclasses.replace(CFG, replay=replay))
    own = update_rows(build_update(WORLD, CFG))
    rows = update_rows(update)
    assert len(rows) == len(own) + round(replay * len(own))
    extra = Counter(map(_key, rows)) - Counter(map(_key, own))  # the update's own rows are all there, unchanged
    assert sum(extra.values()) == round(replay * len(own))
    eligible = Counter(map(_key, _eligible(update)))  # a row can be in the corpus twice (a repeated comparison)
    assert set(extra) <= set(eligible)  # recall marks and spans as pretraining has them
    passes = sum(extra.values()) // eligible.total()  # whole passes over the pool: every eligible row, evenly
    assert all(passes * n <= extra[k] <= (passes + 1) * n for k, n in eligible.items())
    assert update_rows(update) == rows  # deterministic
    other = update_rows(build_update(WORLD, dataclasses.replace(CFG, seed=4, replay=replay)))
    assert Counter(map(_key, other)) - Counter(map(_key, update_rows(build_update(WORLD, dataclasses.replace(
        CFG, seed=4))))) != extra  # another seed, another draw


def test_replay_never_restates_a_changed_value_or_names_a_new_person():
    update = build_update(WORLD, dataclasses.replace(CFG, replay=7.0))
    own = Counter(map(_key, update_rows(build_update(WORLD, CFG))))
    replayed = [json.loads(k) for k in Counter(map(_key, update_rows(update))) - own]
    changed_in_corpus = [r for r in PRETRAINING if any(c.person.name in r["text"] for c in update.changed)]
    assert changed_in_corpus  # the pool really had rows stating the old values
    for row in replayed:
        full = row["context"] + row["text"]
        assert not any(c.person.name in full for c in update.changed)
        assert not any(p.name in full for p in update.new_people)


@pytest.mark.parametrize("replay_fraction", [0.0, 1.0])
def test_replayed_rows_alone_can_carry_contexts(replay_fraction):
    """``replay_in_context_fraction`` sets the contexts of the replayed rows apart from the update's own rows."""
    update = build_update(WORLD, dataclasses.replace(CFG, replay=2.0))
    rows = update_rows(update, in_context_fraction=1.0 - replay_fraction, anchor_column=True,
                       replay_in_context_fraction=replay_fraction)
    own, replayed = [r for r in rows if not r["anchor"]], [r for r in rows if r["anchor"]]
    assert own and replayed
    # The replayed rows as pretraining writes them at their own fraction (the oracle: the corpus itself).
    oracle = {_key(r) for r in pretraining_corpus(WORLD.cfg, num_drills=0, in_context_fraction=replay_fraction)
              .to_list()}
    assert all(_key({k: v for k, v in r.items() if k != "anchor"}) in oracle for r in replayed)
    assert any(r["context"] for r in replayed) == (replay_fraction == 1.0)
    assert any(r["context"] for r in own) == (replay_fraction == 0.0)  # the update's own rows at theirs
    with pytest.raises(ValueError, match="replay_in_context_fraction must be in"):
        update_rows(update, replay_in_context_fraction=1.5)


def test_replay_rows_get_contexts_as_pretraining_writes_them():
    update = build_update(WORLD, dataclasses.replace(CFG, replay=7.0))
    own = Counter(map(_key, update_rows(build_update(WORLD, CFG), in_context_fraction=0.5)))
    replayed = Counter(map(_key, update_rows(update, in_context_fraction=0.5))) - own
    oracle = {_key(r) for r in pretraining_corpus(WORLD.cfg, num_drills=0, in_context_fraction=0.5).to_list()}
    assert set(replayed) <= oracle and any(json.loads(k)["context"] for k in replayed)


def test_eval_splits_do_not_depend_on_replay():
    assert update_splits(build_update(WORLD, CFG)) == update_splits(build_update(WORLD, dataclasses.replace(
        CFG, replay=2.0)))


def test_replay_goes_through_the_corpus_kwargs_and_update_files(tmp_path):
    cfg = dataclasses.replace(CFG, replay=1.5)
    kwargs = update_kwargs(WORLD.cfg, cfg)
    assert kwargs["update"]["replay"] == 1.5
    rows = update_corpus(**kwargs).to_list()
    assert sorted(map(_key, rows)) == sorted(map(_key, update_rows(build_update(WORLD, cfg), anchor_column=True)))
    save_update_files(kwargs, tmp_path)
    assert load_update(tmp_path).cfg == cfg
    (tmp_path / "update.json").write_text(json.dumps({"seed": 3, "new_people": 8, "changed_facts": 5}))
    assert load_update(tmp_path).cfg == CFG  # an update written before replay existed: none

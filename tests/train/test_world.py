"""The synthetic world: determinism, split disjointness, well-formed examples and spans."""

import json
import re

import pytest

from pure_reasoner.train.world.generator import (
    SPLITS,
    WorldConfig,
    build_world,
    drill_rows,
    eval_splits,
    main,
    pretraining_corpus,
    reading_drills,
    world_config,
)
from pure_reasoner.train.world.text import ATTRIBUTES, QUESTIONS, TWO_HOP


@pytest.fixture(scope="module")
def world():
    return build_world(world_config("tiny", seed=3))


@pytest.fixture(scope="module")
def corpus(world):
    return pretraining_corpus(world, in_context_fraction=0.5)


@pytest.fixture(scope="module")
def splits(world):
    return eval_splits(world)


def _mentions(name: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", text) is not None


def test_same_seed_same_datasets():
    cfg = world_config("tiny", seed=11)
    a, b = build_world(cfg), build_world(cfg)
    assert a == b
    corpus_a, corpus_b = (pretraining_corpus(w, in_context_fraction=0.3).to_list() for w in (a, b))
    assert corpus_a == corpus_b
    for split in SPLITS:
        assert eval_splits(a)[split].to_list() == eval_splits(b)[split].to_list()
    other = build_world(world_config("tiny", seed=12))
    assert other.people != a.people
    assert pretraining_corpus(other)["text"] != pretraining_corpus(a)["text"]


def test_names_unique_and_sizes(world):
    cfg = world.cfg
    names = [p.name for p in world.people + world.unseen]
    assert len(set(names)) == len(names) == cfg.num_people + cfg.num_unseen
    assert len(world.city_country) == cfg.num_countries * cfg.cities_per_country
    assert len(set(world.city_country.values())) == cfg.num_countries
    assert set(world.employer_city.values()) <= set(world.city_country)
    assert len(world.qa_people) == cfg.num_qa_people and len(world.heldout_people) == cfg.num_people - cfg.num_qa_people


def test_no_unseen_person_in_training(world, corpus):
    training = "\n".join(list(corpus["context"]) + list(corpus["text"]))
    leaked = [p.name for p in world.unseen if _mentions(p.name, training)]
    assert leaked == []
    # Known people do appear (the check above can fail).
    assert all(_mentions(p.name, training) for p in world.people)


def test_heldout_people_only_in_biographies(world, corpus):
    heldout = [p.name for p in world.heldout_people]
    for row in corpus:
        if row["kind"] in ("qa", "comparison"):
            full = row["context"] + row["text"]
            assert not [n for n in heldout if _mentions(n, row["text"])], row["text"]
            assert not [n for n in heldout if _mentions(n, full)]


def test_no_eval_question_in_training(world, corpus, splits):
    training = "\n".join(list(corpus["context"]) + list(corpus["text"]))
    for split in ("closed_book", "closed_book_two_hop", "comparison"):
        for ex in splits[split]:
            assert f"Q: {ex['question']}\n" not in training, ex["question"]
    # The same questions about QA people are there, in the same format (so the check above can fail).
    qa = [f"Q: {QUESTIONS[a].format(name=p.name)}\n" for p in world.qa_people for a in QUESTIONS]
    assert all(q in training for q in qa)


def test_drills_are_fresh_and_deterministic(world):
    a, b, c = reading_drills(world, 5, 4), reading_drills(world, 5, 4), reading_drills(world, 6, 4)
    assert a == b
    names = world.names
    for drill in a + c:
        assert drill["person"] not in names
        assert all(not _mentions(n, drill["context"]) for n in names)
    assert {d["person"] for d in a}.isdisjoint({d["person"] for d in c})


def test_every_example_is_well_formed(world, splits):
    for split in SPLITS:
        data = splits[split]
        assert len(data) == world.cfg.eval_examples
        for ex in data:
            n = 2 if split == "comparison" else world.cfg.num_choices
            assert len(ex["choices"]) == len(set(ex["choices"])) == n
            assert ex["choices"][ex["gold"]] == ex["answer"]
            assert ex["prompt"] == ex["context"] + f"Q: {ex['question']}\nA:"
            full = ex["prompt"] + f" {ex['answer']}."
            for span in ex["spans"]:
                assert span["type"] in ("name", "answer", "city", "company", "country", "headquarters",
                                        *ATTRIBUTES), span
                if span["type"] == "name":
                    assert full[span["start"] : span["end"]] == span["entity"]
            (answer_span,) = [s for s in ex["spans"] if s["type"] == "answer"]
            assert full[answer_span["start"] : answer_span["end"]] == ex["answer"]


def test_open_book_answer_is_in_context(world, splits):
    for split in ("open_book", "open_book_two_hop", "counterfactual"):
        for ex in splits[split]:
            stated = {(s["entity"], s["type"], ex["context"][s["start"] : s["end"]])
                      for s in ex["spans"] if s["end"] <= len(ex["context"])}
            if ex["attribute"] in TWO_HOP:
                # The subject's birth city (employer) is in context, and so is the bridge fact from it to the answer.
                key, kind = ("birth_city", "country") if ex["attribute"] == "birth_country" else ("employer",
                                                                                                 "headquarters")
                (hop,) = {v for e, t, v in stated if e == ex["person"] and t == key}
                assert (hop, kind, ex["answer"]) in stated, ex["prompt"]
            else:
                assert (ex["person"], ex["attribute"], ex["answer"]) in stated, ex["prompt"]


def test_counterfactual_contradicts_training(world, splits):
    known = {p.name: world.values(p) for p in world.people}
    for ex in splits["counterfactual"]:
        assert ex["person"] in known
        assert ex["memorised"] == known[ex["person"]][ex["attribute"]] != ex["answer"]
        assert ex["memorised"] in ex["choices"]


def test_biographies_name_every_sentence(world, corpus):
    bios = [r["text"] for r in corpus if r["kind"] == "bio"]
    assert len(bios) == world.cfg.num_people * world.cfg.bios_per_person
    for bio, row in zip(bios, [r for r in corpus if r["kind"] == "bio"], strict=True):
        (person,) = {s["entity"] for s in row["spans"] if s["start"] >= len(row["context"])}
        sentences = [s for s in re.split(r"(?<=\.) ", bio) if s]
        assert len(sentences) == len(ATTRIBUTES)
        assert all(person in s for s in sentences)
        full = row["context"] + row["text"]
        values = world.values(next(p for p in world.people if p.name == person))
        found = {s["type"]: full[s["start"] : s["end"]] for s in row["spans"] if s["start"] >= len(row["context"])}
        assert {a: found[a] for a in ATTRIBUTES} == {a: values[a] for a in ATTRIBUTES}


def test_exhausted_name_pool_raises_instead_of_hanging(world):
    names = len(world.first_names) * len(world.last_names)
    with pytest.raises(ValueError, match="full names are all taken"):
        world.fresh_people("too-many", names)  # the world's own people already hold some of them
    assert len(world.fresh_people("fits", names - len(world.names))) == names - len(world.names)


def test_in_context_fraction(world):
    none = pretraining_corpus(world, in_context_fraction=0.0, num_drills=3)
    assert [r["kind"] for r in none if r["context"]] == ["drill"] * 3
    every = pretraining_corpus(world, in_context_fraction=1.0, num_drills=0)
    assert all(bool(r["context"]) == (r["kind"] != "world") for r in every)
    merged = pretraining_corpus(world, in_context_fraction=1.0, num_drills=0, context_column=False)
    assert "context" not in merged.column_names
    assert merged["text"] == [r["context"] + r["text"] for r in every]


@pytest.mark.parametrize("bad, match", [
    (dict(num_people=0), "num_people"),
    (dict(qa_fraction=1.0), "qa_fraction"),
    (dict(num_countries=1), "num_countries"),
    (dict(num_majors=99), "num_majors"),
    (dict(num_unseen=2, num_distractors=2), "num_unseen"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        world_config("tiny", **bad)
    with pytest.raises(ValueError, match="frobnicate"):
        world_config("tiny", frobnicate=1)
    with pytest.raises(ValueError, match="in_context_fraction"):
        pretraining_corpus(WorldConfig(), in_context_fraction=1.5)


def test_cli_writes_splits(tmp_path):
    main(["--out", str(tmp_path), "--preset", "tiny", "--set", "seed=4", "eval_examples=3"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert WorldConfig(**manifest["generator"]) == world_config("tiny", seed=4, eval_examples=3)
    for split in SPLITS:
        lines = (tmp_path / "eval" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [f"{split}-{i}" for i in range(3)]


def test_hydra_style_call_and_drill_rows(world):
    # data.generator=pure_reasoner.train.world.generator:pretraining_corpus with plain keyword values only.
    assert pretraining_corpus(preset="tiny", seed=3, num_drills=2).to_list() == \
        pretraining_corpus(world, num_drills=2).to_list()
    rows = drill_rows(world, 0, 3)
    assert rows == drill_rows(world, 0, 3) and rows != drill_rows(world, 1, 3)
    corpus_drills = [r for r in pretraining_corpus(world, num_drills=3) if r["kind"] == "drill"]
    assert {r["text"] for r in rows}.isdisjoint({r["text"] for r in corpus_drills})  # another stream of people
    for row in rows:
        assert row["context"] and row["text"].startswith("Q: ") and row["text"].endswith(".")
        full = row["context"] + row["text"]
        (answer,) = [s for s in row["spans"] if s["type"] == "answer"]
        assert row["text"].endswith(f"A: {full[answer['start'] : answer['end']]}.")

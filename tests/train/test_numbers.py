"""Whole-number tokens (data.tokenizer=bpe_numbers): each number of the corpus's ranges is one token."""

import re

import datasets
import pytest

from pure_reasoner.train import data
from pure_reasoner.train.numbers import number_tokens, without_numbers
from pure_reasoner.train.world.generator import build_world, corpus_world_config, pretraining_corpus


def test_number_tokens_by_hand():
    texts = ["born on May 22, 1952.", "June 3, 1955; 5 cats, 8 dogs", "room 007, 12 rooms, flat B9"]
    # classes: " 1-digit" 3..8, " 2-digit" 12..22, " 4-digit" 1952..1955, "1-digit" 9..9; "007" left out
    expected = ([f" {n}" for n in range(3, 9)] + [f" {n}" for n in range(12, 23)]
                + [" 1952", " 1953", " 1954", " 1955", "9"])
    assert sorted(number_tokens(texts)) == sorted(expected)
    assert number_tokens(["no digits here"]) == []
    assert without_numbers("May 22, 1952. B9.") == "May,. B."


def test_every_world_number_is_one_token():
    world = build_world(corpus_world_config(preset="tiny"))
    docs = pretraining_corpus(world, in_context_fraction=0.5, num_drills=4)
    tok = data.train_tokenizer(docs, "bpe_numbers", 512)
    assert tok.get_vocab_size() <= 512 and tok.token_to_id(data.EOD) is not None
    texts = list(docs["text"]) + [c for c in docs["context"] if c]
    for text in texts[:200]:
        enc = tok.encode(text)
        assert tok.decode(enc.ids) == text
        numbers = [m.group(0) for m in re.finditer(r" ?\d+", text)]
        assert [t for t in (tok.decode([i]) for i in enc.ids) if any(ch.isdigit() for ch in t)] == numbers
    assert tok.decode(tok.encode("in 98765.").ids) == "in 98765."  # outside every range: still round-trips
    # plain BPE splits the same years into pieces: what the option changes
    year = next(m.group(0) for t in texts for m in re.finditer(r" \d{4}", t))
    assert len(tok.encode(year).ids) == 1 and len(data.train_tokenizer(docs, "bpe", 512).encode(year).ids) > 1


def test_too_many_numbers_is_an_error():
    docs = datasets.Dataset.from_dict({"text": ["from 100 to 999"]})
    with pytest.raises(ValueError, match="need 900 tokens"):
        data.train_tokenizer(docs, "bpe_numbers", 512)

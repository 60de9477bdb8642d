"""Fixtures for the training-stack tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dist_info():
    """A one-rank gloo process group for in-process engine tests (shared by the whole session)."""
    from pure_reasoner.train.dist import init_distributed

    return init_distributed()


@pytest.fixture(scope="module")
def world():
    """The tiny world, seed 3, of the drill tests (a module may define its own ``world``)."""
    from pure_reasoner.train.world.generator import build_world, world_config

    return build_world(world_config("tiny", seed=3))


@pytest.fixture(scope="module")
def tok(world):
    """A 384-token BPE tokenizer trained on ``world``'s pretraining corpus with its contexts."""
    from pure_reasoner.train import data
    from pure_reasoner.train.world.generator import pretraining_corpus

    docs = pretraining_corpus(world, in_context_fraction=0.5, num_drills=8, drill_questions=4)
    merged = docs.map(lambda r: {"text": r["context"] + r["text"]}, remove_columns=docs.column_names)
    return data.train_tokenizer(merged, "bpe", 384)

"""Configs saved before the pure_reasoner namespace name the world generator by its former module path."""

from pure_reasoner.train.config import WORLD_GENERATOR, DataConfig, current_generator


def test_the_former_world_generator_path_maps_to_the_current_one():
    assert current_generator("train.world:pretraining_corpus") == WORLD_GENERATOR
    assert WORLD_GENERATOR != "train.world:pretraining_corpus"
    assert current_generator("my.module:rows") == "my.module:rows"
    cfg = DataConfig(source="generator", generator="train.world:pretraining_corpus")
    assert cfg.generator == WORLD_GENERATOR

"""Helpers for the training-stack tests: compose configs like ``python -m train`` does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import Config, register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(*overrides: str) -> Config:
    """The typed Config that ``python -m train <overrides>`` would run."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def compose_raw(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def dist_info():
    """A one-rank gloo process group for in-process engine tests (shared by the whole session)."""
    from train.dist import init_distributed

    return init_distributed()

"""Helpers for the training-stack tests: compose configs and train in process like ``python -m train``."""

from __future__ import annotations

from pathlib import Path

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


SMALL_RUN = (
    "experiment=smoke",
    "train.max_steps=12",
    "train.ckpt_every=4",
    "train.log_every=4",
    "train.progress=false",
    "data.max_chars=60000",
    "train.threads=1",  # bitwise-reproducible matmuls across runs and processes
)


def run_in_process(run_dir: Path, *overrides: str):
    """Train in this process (a one-rank group) exactly as ``python -m train`` would; returns the Summary."""
    from train.loop import run

    raw = compose_raw(*SMALL_RUN, *overrides)
    return run(OmegaConf.to_object(raw), run_dir, OmegaConf.to_yaml(raw, resolve=True))


def metrics(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

"""Helpers for the training-stack tests: compose configs and train in process like ``python -m pure_reasoner.train``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pure_reasoner.train.config import Config, register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"


def on_plain_base(overrides: tuple[str, ...]) -> list[str]:
    """``overrides`` with ``experiment=plain`` in front unless they select an experiment themselves: the tests
    of options compose them on the library's base config, not on the first run the bare command runs."""
    selects = any(o.lstrip("+~").split("=")[0] == "experiment" for o in overrides)
    return list(overrides) if selects else ["experiment=plain", *overrides]


def compose_config(*overrides: str) -> Config:
    """The typed Config that ``python -m pure_reasoner.train <overrides>`` would run, on the plain base unless the
    overrides select an experiment (``on_plain_base``)."""
    return OmegaConf.to_object(compose_raw(*overrides))


def compose_raw(*overrides: str):
    """``compose_config``'s config before it is made typed."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=on_plain_base(overrides))


SHORT = (
    "train.max_steps=12",
    "train.ckpt_every=4",
    "train.log_every=4",
    "train.progress=false",
    "train.threads=1",  # bitwise-reproducible matmuls across runs and processes
)
SMALL_RUN = ("experiment=smoke", "data.max_chars=60000", *SHORT)
RECIPE_RUN = ("experiment=decoupling_smoke", *SHORT)  # the decoupling recipe's features, ~10 s on one core


class Crash(RuntimeError):
    """A failure injected into a training run by a test."""


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the next in-process run raise ``Crash`` when it asks for the data of ``step`` (0-based)."""
    from pure_reasoner.train import data as train_data

    real = train_data.micro_batch_positions

    def positions(s, *args):
        if s == step:
            raise Crash(f"injected crash at step {s}")
        return real(s, *args)

    monkeypatch.setattr(train_data, "micro_batch_positions", positions)


def run_in_process(run_dir: Path, *overrides: str, base: tuple[str, ...] = SMALL_RUN):
    """Train in this process (a one-rank group) exactly as ``python -m pure_reasoner.train <base> <overrides>`` would;
    returns the Summary."""
    from pure_reasoner.train.loop import run

    raw = compose_raw(*base, *overrides)
    return run(OmegaConf.to_object(raw), run_dir, OmegaConf.to_yaml(raw, resolve=True))


DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def launch(run_dir: Path, *overrides: str, base: tuple[str, ...] = SMALL_RUN) -> subprocess.Popen:
    """``deepspeed --no_local_rank --num_gpus 2 --module pure_reasoner.train ...``: docs/training.md's multi-process
    command."""
    from pure_reasoner.train.dist import _free_port

    cmd = [DEEPSPEED, "--no_local_rank", "--num_gpus", "2", "--master_port", str(_free_port()),
           "--module", "pure_reasoner.train", *base, f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for a launch; asserts it succeeded and returns its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def train_ranks(launcher: subprocess.Popen) -> list:
    """The ``python -m pure_reasoner.train`` processes (psutil) a launcher started."""
    import psutil

    def runs_train(cmdline: list[str]) -> bool:
        return "-m" in cmdline and cmdline[cmdline.index("-m") + 1 :][:1] == ["pure_reasoner.train"]

    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if runs_train(p.cmdline())]


def metrics(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def rebuilt_micro_batches(run_dir: Path, steps: list[int]) -> list[dict]:
    """A finished run's micro-batches (micro-step 0) of ``steps``, rebuilt from its config and tokenizer as one
    rank of one reads them: the data ``train.evaluation.stream_rate`` and ``train.calibration`` are checked on."""
    import shutil
    import tempfile

    import torch

    from pure_reasoner.train.dist import DistInfo
    from pure_reasoner.train.export import load_run_config
    from pure_reasoner.train.loop import prepare_data

    cfg = load_run_config(run_dir)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(run_dir / "tokenizer.json", Path(scratch) / "tokenizer.json")
        train_data, _ = prepare_data(cfg, Path(scratch), info)
    return [train_data.micro_batch(cfg, info, step, 0) for step in steps]


def routed_shares(model, batches: list[dict]) -> list[float]:
    """The oracle of a consult rate: per MoE layer, the share of the tokens of ``batches`` whose expert ids (the
    router's own output, read by a hook; the model in eval mode) hold any real expert."""
    import torch

    model.eval()
    layers = model.moe_layers()
    consulted, tokens = [0] * len(layers), 0
    captured: list[torch.Tensor] = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out.expert_ids_TK))
             for layer in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                captured.clear()
                model(batch["idx_BS"], doc_ids_BS=batch["doc_ids_BS"])
                for i, ids_TK in enumerate(captured):
                    consulted[i] += int((ids_TK >= 0).any(1).sum())
                tokens += batch["idx_BS"].numel()
    finally:
        for hook in hooks:
            hook.remove()
    return [c / tokens for c in consulted]

"""Datasets of the ``pure_reasoner`` lm_eval tasks: local JSON-lines files of the world's evaluation splits.

Where the files come from (first that applies):
  1. ``world_dir``: a world directory (``docs/world_schema.md``; ``python -m pure_reasoner.train.world --out DIR``
     writes the built-in one), its ``DIR/eval/<split>.jsonl``, from
     ``--metadata '{"world_dir": "DIR"}'``, ``--model_args ...,world_dir=DIR`` or the env var PURE_REASONER_WORLD_DIR;
  2. ``CHECKPOINT/world/eval/<split>.jsonl`` when the checkpoint directory carries a world directory (CHECKPOINT:
     model_args ``checkpoint``, or ``pretrained`` for ``lm_eval --model hf`` on an export);
  3. else the splits are regenerated in memory from ``CHECKPOINT/world.json`` (the generator is deterministic,
     so this is the same data as 1 for the same WorldConfig).
Nothing is downloaded (works with HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

import pure_reasoner.train.evaluation.lm_eval_model  # noqa: F401  registers the pure_reasoner model when a task YAML is loaded by path
from pure_reasoner.train.world.disk import EVAL_DIR, read_split
from pure_reasoner.train.world.generator import SPLITS, build_world, eval_splits, load_world_config
from pure_reasoner.train.world.text import continuation


def _with_choice_texts(data: datasets.Dataset) -> datasets.Dataset:
    """Add ``choice_texts``: the exact continuations train.evaluation.evaluate scores (``" {choice}."``)."""
    return data.map(lambda ex: {"choice_texts": [continuation(c) for c in ex["choices"]]})


def load_split(split: str, world_dir: str | None = None, checkpoint: str | None = None, pretrained: str | None = None,
               **_unused):
    """{"test": Dataset} of one split (called by lm_eval with the task's metadata and dataset_kwargs, which include
    the model_args: ``checkpoint`` of our model, ``pretrained`` of lm_eval's stock ``hf`` model on an export)."""
    checkpoint = checkpoint or pretrained
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    world_dir = world_dir or os.environ.get("PURE_REASONER_WORLD_DIR")
    candidates = [Path(world_dir)] if world_dir else []
    candidates += [Path(checkpoint) / "world"] if checkpoint else []
    for directory in candidates:
        path = directory / EVAL_DIR / f"{split}.jsonl"
        if path.is_file():
            rows = [{k: v for k, v in ex.items() if k != "facts"} for ex in read_split(path, split)]
            return {"test": _with_choice_texts(datasets.Dataset.from_list(rows))}
    if world_dir:
        raise ValueError(f"world_dir {world_dir} has no {EVAL_DIR}/{split}.jsonl (write it with "
                         "python -m pure_reasoner.train.world --out)")
    if checkpoint is None or not (Path(checkpoint) / "world.json").is_file():
        raise ValueError(f"no data for split {split!r}: pass world_dir=DIR, or a checkpoint with world.json")
    world = build_world(load_world_config(Path(checkpoint) / "world.json"))
    return {"test": _with_choice_texts(eval_splits(world, (split,))[split])}

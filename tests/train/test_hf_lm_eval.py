"""lm_eval's stock ``hf`` model on an export (trust_remote_code, offline) scores the world's local tasks exactly as
train.evaluation.evaluate does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.moe.checkpoint import save_pretrained
from pure_reasoner.train.evaluation.evaluate import Codec
from pure_reasoner.train.protocol import RANK_VARIABLES
from pure_reasoner.train.world.generator import build_world, save_world_config, world_config
from tests.train.lm_eval_check import assert_lm_eval_matches_train_eval

ROOT = Path(__file__).resolve().parents[2]


def test_stock_hf_model_scores_like_train_eval(tmp_path):
    pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install '.[eval]')")
    pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")
    pytest.importorskip("accelerate", reason="lm_eval's hf model needs accelerate (pip install '.[dev]')")
    cfg = world_config("tiny", seed=3, num_distractors=0, eval_examples=4)
    model = PureReasonerLM(ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=512, reasoning_width=64,
        knowledge=KnowledgeConfig(num_experts=4, expert_width=32, top_k=2, consult_rate=0.5),
    )).eval()
    export = save_pretrained(model, tmp_path / "export", hf=True)  # no tokenizer.json: byte ids, as Codec()
    save_world_config(cfg, export)
    path = os.pathsep.join([str(ROOT), *sys.path[1:]])  # this interpreter's packages (accelerate may be a user's)
    # Not an earlier in-process run's rendezvous (MASTER_PORT of a store still listening here): a process of its own.
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env = {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={export},trust_remote_code=True", "--device", "cpu",
           # batch 1: lm_eval left-pads generation batches, which the model refuses (it attends to every position)
           "--batch_size", "1", "--log_samples", "--tasks", "pr_counterfactual,pr_open_book_gen",
           "--include_path", str(ROOT / "train/evaluation/lm_eval_tasks"), "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_lm_eval_matches_train_eval(model, Codec(), build_world(cfg), tmp_path / "out")

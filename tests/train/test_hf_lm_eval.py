"""lm_eval's stock ``hf`` model on an export (trust_remote_code, offline) scores the world's local tasks exactly as
train.eval does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from moe.checkpoint import save_pretrained
from train import eval_metrics as em
from train.eval import Codec, evaluate_split, greedy_generate, score_continuations
from train.world import build_world, save_world_config, world_config
from train.world_splits import split_examples
from train.world_text import continuation

ROOT = Path(__file__).resolve().parents[2]


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


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
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]]),
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
           "--device", "cpu", "--batch_size", "1", "--log_samples", "--tasks", "pr_counterfactual,pr_open_book_gen",
           "--include_path", str(ROOT / "train/lm_eval_tasks"), "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_path,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_path.read_text())["results"]
    world = build_world(cfg)

    counterfactual = split_examples(world, "counterfactual")
    pairs = [(ex["prompt"], continuation(c)) for ex in counterfactual for c in ex["choices"]]
    ours, _, _ = score_continuations(model, Codec(), pairs)
    theirs = [float(resp[0]) for s in _samples(tmp_path / "out", "pr_counterfactual") for resp in s["filtered_resps"]]
    assert theirs == pytest.approx(ours, abs=1e-4)
    assert results["pr_counterfactual"]["acc,none"] == evaluate_split(model, Codec(), counterfactual, "base",
                                                                      generate=False).acc

    open_book = split_examples(world, "open_book")
    ours = greedy_generate(model, Codec(), [ex["prompt"] for ex in open_book], 32)
    assert not any("\x00" in o for o in ours)  # byte 0 is the export's eos: lm_eval would stop there, we would not
    theirs = [s["filtered_resps"][0] for s in _samples(tmp_path / "out", "pr_open_book_gen")]
    assert theirs == [o.strip() for o in ours]
    assert results["pr_open_book_gen"]["exact_match,strip"] == em.accuracy(
        [o.strip() == ex["answer"] for o, ex in zip(ours, open_book, strict=True)])

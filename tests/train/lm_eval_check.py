"""What an lm_eval run on the world's tasks must agree on with train.evaluation (shared by the lm_eval tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pure_reasoner.train.evaluation import scores as em
from pure_reasoner.train.evaluation.evaluate import evaluate_split, greedy_generate, score_continuations
from pure_reasoner.train.world.splits import split_examples
from pure_reasoner.train.world.text import continuation


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def assert_lm_eval_matches_train_eval(model, codec, world, out: Path) -> None:
    """lm_eval's output in ``out`` (``--log_samples``, tasks pr_counterfactual and pr_open_book_gen) equals what
    train.evaluation.evaluate computes for ``model``: each choice's log-likelihood and the accuracy; each greedy answer
    (cut at the first stop string) and the exact match."""
    (results_path,) = out.rglob("results_*.json")
    results = json.loads(results_path.read_text())["results"]

    counterfactual = split_examples(world, "counterfactual")
    pairs = [(ex["prompt"], continuation(c)) for ex in counterfactual for c in ex["choices"]]
    ours, _, _ = score_continuations(model, codec, pairs)
    theirs = [float(resp[0]) for s in _samples(out, "pr_counterfactual") for resp in s["filtered_resps"]]
    assert theirs == pytest.approx(ours, abs=1e-4)
    assert results["pr_counterfactual"]["acc,none"] == evaluate_split(model, codec, counterfactual, "base",
                                                                      generate=False).acc

    open_book = split_examples(world, "open_book")
    ours = greedy_generate(model, codec, [ex["prompt"] for ex in open_book], 32)
    assert not any("\x00" in o for o in ours)  # byte 0 is a byte-id export's eos: lm_eval would stop there, we not
    assert [s["filtered_resps"][0] for s in _samples(out, "pr_open_book_gen")] == [o.strip() for o in ours]
    assert results["pr_open_book_gen"]["exact_match,strip"] == em.accuracy(
        [o.strip() == ex["answer"] for o, ex in zip(ours, open_book, strict=True)])

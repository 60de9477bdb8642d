"""train.evaluation.report on hand-made eval reports: the numbers land in the right cells, plots are written, bad
input fails."""

import json

import pytest

from pure_reasoner.train.evaluation.report import build, main


def _report(base_closed: float, off_closed: float, faith: float, checkpoint: str = "/nonexistent") -> dict:
    def cell(adj):
        return {"n": 8, "chance": 0.25, "acc": 0.25 + 0.75 * adj, "acc_adjusted": adj, "exact_match": None,
                "acc_interval": [0, 1], "well_above_chance": False, "truncated": 0}
    return {
        "checkpoint": checkpoint,
        "splits": {"closed_book": {"base": cell(base_closed), "knowledge_off": cell(off_closed)},
                   "open_book": {"base": cell(0.5), "knowledge_off": cell(0.45)}},
        "decoupling": [{"closed": "closed_book", "open": "open_book", "score": 0.7, "reason": "ok",
                        "closed_relative_drop": 0.8, "open_relative_drop": 0.1, "open_min_adjusted": 0.5}],
        "faithfulness": {"base": {"choice": {"follows_context": faith, "follows_memory": 1 - faith, "neither": 0.0,
                                             "faithfulness": faith, "n": 8}, "generation": None}},
        "knowledge_bits": {"bits": 12.0, "max_bits": 100.0, "bits_per_knowledge_param": 0.001,
                           "bits_per_param": 0.0005},
        "routing": {"closed_book": {"answer_rate": 0.3, "other_rate": 0.1, "ratio": 3.0,
                                    "per_layer": [{"answer_rate": 0.2, "other_rate": 0.1, "ratio": 2.0},
                                                  {"answer_rate": 0.4, "other_rate": 0.1, "ratio": 4.0}]}},
    }


def test_report_from_hand_made_json(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "reasoner.json").write_text(json.dumps(_report(0.6, 0.05, 0.9)))
    (tmp_path / "eval" / "dense.json").write_text(json.dumps(_report(0.4, 0.4, 0.2)))
    recorded = {"seq_len": 512, "flops_per_token": 7.8e6, "active_params": 7.8e5, "total_params": 7.8e5}
    run = {"wall_s": 321, "commands": ["python -m pure_reasoner.train x"], "flops": recorded}
    (tmp_path / "runs.json").write_text(json.dumps({"dense": run}))
    (tmp_path / "notes.md").write_text("## What was run\n")
    assert main([str(tmp_path)]) == 0
    out = json.loads((tmp_path / "decoupling.json").read_text())
    by_name = {m["model"]: m for m in out["models"]}
    assert set(by_name) == {"reasoner", "dense"}
    assert by_name["reasoner"]["splits"]["closed_book"]["knowledge_off"]["acc_adjusted"] == 0.05
    assert by_name["dense"]["faithfulness"]["base"]["faithfulness"] == 0.2
    assert by_name["dense"]["run"]["wall_s"] == 321 and by_name["reasoner"]["run"] == {}
    assert by_name["reasoner"]["flops"] is None  # the checkpoint is not on disk, and no run record has FLOPs
    assert by_name["dense"]["flops"] == recorded  # ... the run record's stand in
    assert [x["ratio"] for x in by_name["reasoner"]["routing"]["closed_book"]["per_layer"]] == [2.0, 4.0]
    md = (tmp_path / "decoupling.md").read_text()
    assert md.startswith("## What was run")
    assert "| reasoner | knowledge_off | +0.050 | +0.450 |" in md
    assert "| dense | base | +0.400 | +0.500 |" in md
    assert "python -m pure_reasoner.train x" in md and "| 321 |" in md
    assert "| 0.90 (0.90 / 0.10 / 0.00) |" in md
    for name in ("accuracy.png", "ablations.png", "consult_rate.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_report_rejects_missing_or_bad_input(tmp_path):
    assert main([str(tmp_path)]) == 2
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.json").write_text(json.dumps({"not": "a report"}))
    with pytest.raises(ValueError, match="x.json"):
        build(tmp_path)

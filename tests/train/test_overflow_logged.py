"""Routed rows past the knowledge path's saved-activation bound are counted in metrics.csv, per step."""

from __future__ import annotations

from tests.train.helpers import metrics, run_in_process


def test_overflow_rows_reach_metrics(tmp_path, dist_info):
    # A bound of exactly the target rate, no floor: a step that routes more than its target overflows it.
    run_in_process(tmp_path / "tight", "train.max_steps=8", "train.ckpt_every=100", "train.export=false",
                   "model.knowledge.saved_rows_factor=1.0", "model.knowledge.saved_rows_min=0")
    tight = [row["overflow_rows"] for row in metrics(tmp_path / "tight")]
    assert len(tight) == 8 and any(n > 0 for n in tight), tight
    # Headroom 8x at rate 1/8: the bound is every slot, nothing can overflow.
    run_in_process(tmp_path / "loose", "train.max_steps=8", "train.ckpt_every=100", "train.export=false",
                   "model.knowledge.saved_rows_factor=8.0")
    assert [row["overflow_rows"] for row in metrics(tmp_path / "loose")] == [0.0] * 8

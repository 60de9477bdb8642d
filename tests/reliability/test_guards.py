"""Numerical guards: non-finite gradients stop (or skip) within the step; router collapse is named per layer."""

from __future__ import annotations

import logging

import pytest
import torch

from pure_reasoner.moe import model as moe_model
from pure_reasoner.train.guards import collapse_warnings
from pure_reasoner.train.loop import TrainingAborted
from tests.train.helpers import metrics, run_in_process

BALANCED = [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]


def test_healthy_router_is_quiet():
    assert collapse_warnings([BALANCED] * 5, [[0.2, 0.3]] * 5, 0.25, 0.9, 5) == []


def test_one_expert_taking_the_load_names_the_layer():
    collapsed = [BALANCED[0], [0.01, 0.97, 0.01, 0.01]]
    warnings = collapse_warnings([collapsed] * 5, [[0.2, 0.3]] * 5, 0.25, 0.9, 5)
    assert warnings == [
        "router collapse in MoE layer 1: expert 1 took > 90% of the load on each of the last 5 steps (min share 0.97)"
    ]
    # one healthy step inside the window, or a window not yet full, is no collapse
    assert collapse_warnings([collapsed] * 4 + [BALANCED], [[0.2, 0.3]] * 5, 0.25, 0.9, 5) == []
    assert collapse_warnings([collapsed] * 4, [[0.2, 0.3]] * 4, 0.25, 0.9, 5) == []
    # the dominant expert changing from step to step is churn, not collapse onto one expert
    other = [BALANCED[0], [0.97, 0.01, 0.01, 0.01]]
    assert collapse_warnings([collapsed, other] * 3, [[0.2, 0.3]] * 6, 0.25, 0.9, 6) == []


@pytest.mark.parametrize("pinned", [0.0, 1.0])
def test_consult_rate_pinned_names_the_layer(pinned):
    rates = [[0.25, pinned]] * 3
    assert collapse_warnings([BALANCED] * 3, rates, 0.25, 0.9, 3) == [
        f"router collapse in MoE layer 1: consult rate pinned at {pinned:g} for the last 3 steps (target 0.25)"
    ]
    # a rate of 1 is the design of mechanism 'always' (target 1.0), not a collapse
    assert collapse_warnings([BALANCED] * 3, rates, 1.0, 0.9, 3) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="got 0, 0.9"):
        collapse_warnings([], [], 0.25, 0.9, 0)


def _nan_grads_at(monkeypatch, call: int) -> None:
    """The ``call``-th forward returns a finite loss whose gradients are NaN: d sqrt(z)/dz at z = 0 is inf,
    times dz/dlogits = 0."""
    real, calls = moe_model.PureReasonerLM.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == call and out.loss is not None:
            out = out._replace(loss=out.loss + torch.sqrt((out.logits_BSV.sum() * 0).abs()))
        return out

    monkeypatch.setattr(moe_model.PureReasonerLM, "forward", forward)


def test_nonfinite_gradients_abort_within_the_step(tmp_path, monkeypatch, dist_info):
    _nan_grads_at(monkeypatch, 7)  # step index 6, after the checkpoint of step 4
    with pytest.raises(
        TrainingAborted, match=r"non-finite gradients at step 6; .* last good checkpoint: step_00000004"
    ):
        run_in_process(tmp_path, "train.max_steps=8")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"


def test_nonfinite_gradients_skip_warns_and_goes_on(tmp_path, monkeypatch, dist_info, caplog):
    _nan_grads_at(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="train"):
        summary = run_in_process(tmp_path, "train.max_steps=4", "train.warmup_steps=1", "train.on_nonfinite=skip")
    assert all(torch.isfinite(torch.tensor(summary.losses)))  # the loss itself was finite throughout
    assert [int(r["skipped"]) for r in metrics(tmp_path)] == [0, 0, 1, 0]
    assert "non-finite gradients at step 2; DeepSpeed dropped the update (train.on_nonfinite=skip)" in caplog.text


def test_collapse_warning_reaches_the_log(tmp_path, monkeypatch, dist_info, caplog):
    """Wired into the loop's metrics path: a router forced onto expert 0 is reported with its layer."""
    from pure_reasoner.moe import router as moe_router

    real = moe_router.KnowledgeRouter.forward

    def forward(self, x_TD):
        r = real(self, x_TD)
        ids_TK = torch.where(r.expert_ids_TK >= 0, torch.zeros_like(r.expert_ids_TK), r.expert_ids_TK)
        return r._replace(expert_ids_TK=ids_TK)

    monkeypatch.setattr(moe_router.KnowledgeRouter, "forward", forward)
    with caplog.at_level(logging.WARNING, logger="train"):
        run_in_process(
            tmp_path, "train.max_steps=4", "train.warmup_steps=1", "train.collapse_window=4", "train.export=false"
        )
    assert "step 4: router collapse in MoE layer 0: expert 0 took > 90% of the load" in caplog.text

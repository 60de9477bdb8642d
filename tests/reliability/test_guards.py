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


@pytest.mark.parametrize("zero", ["deepspeed=zero1", "deepspeed=zero0"])
def test_nonfinite_gradients_abort_within_the_step(tmp_path, monkeypatch, dist_info, zero):
    _nan_grads_at(monkeypatch, 7)  # step index 6, after the checkpoint of step 4
    with pytest.raises(
        TrainingAborted, match=r"non-finite gradients at step 6; .* last good checkpoint: step_00000004"
    ):
        run_in_process(tmp_path, "train.max_steps=8", zero)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"


def test_nonfinite_gradients_skip_warns_and_goes_on(tmp_path, monkeypatch, dist_info, caplog):
    _nan_grads_at(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="train"):
        summary = run_in_process(tmp_path, "train.max_steps=4", "train.warmup_steps=1", "train.on_nonfinite=skip")
    assert all(torch.isfinite(torch.tensor(summary.losses)))  # the loss itself was finite throughout
    assert [int(r["skipped"]) for r in metrics(tmp_path)] == [0, 0, 1, 0]
    assert "non-finite gradients at step 2; the update was dropped (train.on_nonfinite=skip)" in caplog.text


def test_nonfinite_gradients_skip_without_zero_as_zero_does(tmp_path, dist_info):
    """Without ZeRO (``train.plain_dp``) the step with non-finite gradients is dropped as DeepSpeed's ZeRO-1 drops it:
    the same steps skipped, and the same losses and gradient norms after it (the weights and the optimizer state
    were left as they were; only the float summation order of the two optimizers differs)."""
    runs = {}
    for zero in ("zero1", "zero0"):
        with pytest.MonkeyPatch.context() as patch:
            _nan_grads_at(patch, 3)
            run_in_process(tmp_path / zero, "train.max_steps=5", "train.warmup_steps=1", "train.on_nonfinite=skip",
                           f"deepspeed={zero}", "train.export=false")
        runs[zero] = metrics(tmp_path / zero)
    for zero in runs:
        assert [int(r["skipped"]) for r in runs[zero]] == [0, 0, 1, 0, 0], zero
    for row, ref in zip(runs["zero0"], runs["zero1"], strict=True):
        assert row["lr"] == ref["lr"]  # the schedule did not advance on the dropped step, as ZeRO's does not
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        if not int(ref["skipped"]):
            assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


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

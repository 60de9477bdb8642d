"""Exports whose consult thresholds are calibrated on the training stream (``train.calibrate_micro_batches``)."""

from __future__ import annotations

import pytest

from pure_reasoner.moe.checkpoint import load_pretrained
from pure_reasoner.train.evaluation import stream_rate
from pure_reasoner.train.export import differing_tensors, export_checkpoint, load_run_config
from tests.train.helpers import RECIPE_RUN, compose_config, rebuilt_micro_batches, routed_shares, run_in_process

CALIBRATION = 3


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("calibrated") / "run"
    run_in_process(run_dir, "data.doc_mask=true", f"train.calibrate_micro_batches={CALIBRATION}", base=RECIPE_RUN)
    return run_dir


def test_export_consults_the_target_share_of_the_stream_after_the_last_step(calibrated):
    cfg = load_run_config(calibrated)
    assert cfg.train.grad_accum == 1
    last = cfg.train.max_steps
    batches = rebuilt_micro_batches(calibrated, list(range(last, last + CALIBRATION)))
    tokens = sum(b["idx_BS"].numel() for b in batches)
    target = cfg.model.knowledge.consult_rate
    shares = routed_shares(load_pretrained(calibrated / "export"), batches)  # the routers' own decisions
    assert len(shares) == sum(map(cfg.model.is_moe_layer, range(cfg.model.n_layers))) > 0
    for share in shares:
        assert abs(share * tokens - target * tokens) <= 2  # the quantile between two order statistics


def test_only_the_thresholds_differ_from_the_checkpoint_as_trained(calibrated, tmp_path):
    plain = export_checkpoint(calibrated, out_dir=tmp_path / "plain", calibrated=False)
    model = load_pretrained(plain)
    thresholds = sorted(name for name, _ in model.named_buffers() if name.endswith("router.margin_threshold"))
    assert len(thresholds) == len(model.moe_layers())
    assert differing_tensors(calibrated / "export", plain) == thresholds  # every layer's moved; nothing else did


def test_the_post_hoc_copy_writes_the_same_thresholds(calibrated, tmp_path):
    done = stream_rate.calibrated_copy(calibrated, tmp_path / "copy", CALIBRATION, 1)
    exported = [float(layer.router.margin_threshold) for layer in load_pretrained(calibrated / "export").moe_layers()]
    assert exported == done["thresholds"]  # the same micro-batches, the same quantiles, to the bit


def test_stream_rate_is_measured_after_the_calibration(calibrated):
    last = load_run_config(calibrated).train.max_steps
    measured = stream_rate.measure_run(calibrated, 2)
    assert measured["steps"] == [last + CALIBRATION, last + CALIBRATION + 1]


@pytest.mark.parametrize("overrides, match", [
    (("train.calibrate_micro_batches=-1",), "train.calibrate_micro_batches must be >= 0, got -1"),
    (("train.calibrate_micro_batches=4", "model.knowledge.mechanism=always", "model.knowledge.consult_rate=1.0"),
     "mechanism='always'"),
])
def test_bad_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose_config(*overrides)

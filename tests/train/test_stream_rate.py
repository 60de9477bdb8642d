"""The consult rate on a run's own training stream (``train.evaluation.stream_rate``)."""

from __future__ import annotations

import json

import pytest
import torch

from pure_reasoner.train.calibration import calibrate
from pure_reasoner.train.evaluation import stream_rate
from tests.train.helpers import RECIPE_RUN, rebuilt_micro_batches, routed_shares, run_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stream_rate") / "run"
    run_in_process(run_dir, "data.doc_mask=true", base=RECIPE_RUN)  # the science runs' packing
    return run_dir


def test_rate_matches_the_routers_own_decisions_after_the_last_step(trained):
    from pure_reasoner.train.export import load_run_config

    cfg = load_run_config(trained)
    assert cfg.train.grad_accum == 1 and cfg.data.doc_mask
    measured = stream_rate.measure_run(trained, 3)
    last = cfg.train.max_steps
    assert measured["steps"] == [last, last + 2]
    assert measured["micro_batches"] == 3
    assert measured["tokens"] == 3 * cfg.train.micro_batch_size * cfg.data.seq_len
    from pure_reasoner.moe.checkpoint import load_pretrained

    batches = rebuilt_micro_batches(trained, [last, last + 1, last + 2])
    expected = routed_shares(load_pretrained(trained / "export"), batches)
    assert measured["per_layer"] == pytest.approx(expected, abs=1e-12)
    assert measured["rate"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert measured["target_rate"] == cfg.model.knowledge.consult_rate
    assert 0.0 < measured["rate"] < 1.0  # the trained thresholds consult some tokens, not all


@pytest.mark.parametrize("threshold, rate", [(-float("inf"), 1.0), (float("inf"), 0.0)])
def test_rate_follows_the_thresholds(trained, threshold, rate):
    from pure_reasoner.moe.checkpoint import load_pretrained

    model = load_pretrained(trained / "export")
    for layer in model.moe_layers():
        layer.router.margin_threshold.fill_(threshold)
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 16))
    measured = stream_rate.consult_rate(model, [{"idx_BS": idx_BS}])
    assert measured["per_layer"] == [rate] * len(model.moe_layers())
    assert measured["tokens"] == 32 and model.training  # the model's mode is given back


def test_cli_writes_into_the_report_and_keeps_the_rest(trained, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"splits": {"closed_book": {}}, "routing": {"closed_book": {"ratio": 2.5}}}))
    assert stream_rate.main([str(trained), "--micro-batches", "2", "--report", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["splits"] == {"closed_book": {}}
    assert written["routing"]["closed_book"] == {"ratio": 2.5}
    assert written["routing"]["train_stream"]["micro_batches"] == 2
    assert "train stream: consult rate" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no_run", "zero_batches", "corrupt_report", "missing_report"])
def test_bad_input_exits_2_and_writes_nothing(trained, tmp_path, capsys, case):
    report = tmp_path / "report.json"
    original = "{not json" if case == "corrupt_report" else json.dumps({"routing": {}})
    if case != "missing_report":
        report.write_text(original)
    run_dir = tmp_path / "empty" if case == "no_run" else trained
    run_dir.mkdir(exist_ok=True)
    batches = "0" if case == "zero_batches" else "1"
    assert stream_rate.main([str(run_dir), "--micro-batches", batches, "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    expected = {"no_run": "config.yaml", "zero_batches": "micro_batches must be > 0, got 0",
                "corrupt_report": "not a readable JSON report", "missing_report": "is not a file"}[case]
    assert expected in err
    if case == "missing_report":
        assert not report.exists()
    else:
        assert report.read_text() == original


def test_calibrated_thresholds_consult_the_target_share_of_their_sample(trained):
    stream = stream_rate.RunStream(trained)
    assert stream.model.cfg.knowledge.mechanism == "gate"
    batches = stream.batches(0, 3)
    target = stream.model.cfg.knowledge.consult_rate
    calibrate(stream.model, batches)
    tokens = sum(b["idx_BS"].numel() for b in batches)
    for share in routed_shares(stream.model.eval(), batches):  # the routers' own decisions on the same sample
        assert abs(share * tokens - target * tokens) <= 2  # the quantile between two order statistics


def test_calibrated_copy_writes_a_new_export_and_leaves_the_run_alone(trained, tmp_path):
    export = trained / "export"
    original = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    out = tmp_path / "calibrated" / "export"  # its parent made on the way
    done = stream_rate.calibrated_copy(trained, out, 2, 2)
    assert {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()} == original
    assert sorted(p.name for p in out.iterdir()) == sorted(original)
    from pure_reasoner.moe.checkpoint import load_pretrained

    thresholds = [float(layer.router.margin_threshold) for layer in load_pretrained(out).moe_layers()]
    assert thresholds == pytest.approx(done["thresholds"], abs=0.0)
    last = done["before"]["steps"][0]
    assert done["calibration_steps"] == [last - 2, last - 1]  # measured after the calibration's micro-batches
    with pytest.raises(ValueError, match="exists"):
        stream_rate.calibrated_copy(trained, out, 2, 2)

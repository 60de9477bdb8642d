"""Bad input fails clearly with nothing written; non-finite losses abort (or skip) with checkpoints intact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pure_reasoner.moe import model as moe_model
from pure_reasoner.train.loop import TrainingAborted
from tests.train.helpers import metrics, run_in_process


def _assert_nothing_written(run_dir):
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.iterdir())


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path):
    return _jsonl(tmp_path / "corpus.jsonl", [{"text": "to be or not to be, that is the question " * 40}] * 20)


def test_jsonl_corpus_trains(tmp_path, corpus, dist_info):
    summary = run_in_process(
        tmp_path / "run", "data=files", f"data.files=[{corpus}]", "train.max_steps=2", "train.warmup_steps=1"
    )
    assert summary.losses and all(torch.isfinite(torch.tensor(summary.losses)))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"missing\.jsonl does not exist"),
        ("malformed", r"bad\.jsonl:3: malformed JSON line"),
        ("no_field", r"no field 'text'"),
        ("empty", r"empty"),
        ("too_short", r"yields \d+ tokens, fewer than one sequence of data.seq_len \+ 1 = 65"),
        ("unknown_type", r"unknown file type '\.csv'"),
        ("bad_generator", r"data.generator='nowhere.at_all:gen' cannot be imported"),
    ],
)
def test_bad_data_names_the_problem(tmp_path, corpus, case, match, dist_info):
    files = {
        "missing": tmp_path / "missing.jsonl",
        "malformed": tmp_path / "bad.jsonl",
        "no_field": _jsonl(tmp_path / "nofield.jsonl", [{"body": "words"}]),
        "empty": tmp_path / "empty.txt",
        "too_short": _jsonl(tmp_path / "short.jsonl", [{"text": "hi"}]),
        "unknown_type": tmp_path / "corpus.csv",
    }
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    source = (
        ["data.source=generator", "data.generator=nowhere.at_all:gen"]
        if case == "bad_generator"
        else ["data=files", f"data.files=[{files[case]}]"]
    )
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        run_in_process(run_dir, *source)
    _assert_nothing_written(run_dir)


def test_cli_bad_input_exits_nonzero_naming_value(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pure_reasoner.train", "experiment=smoke", "data.seq_len=0", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "data.seq_len must be > 0, got 0" in proc.stderr
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def _nan_loss_at(monkeypatch, call: int) -> None:
    """From the ``call``-th forward on, the loss is NaN (as a diverging run would report it)."""
    real, calls = moe_model.PureReasonerLM.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= call and out.loss is not None:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(moe_model.PureReasonerLM, "forward", forward)


def test_nonfinite_loss_aborts_before_the_update(tmp_path, monkeypatch, dist_info):
    _nan_loss_at(monkeypatch, 7)  # step 7: after the checkpoint of step 4
    with pytest.raises(TrainingAborted, match=r"non-finite loss nan at step 6 .* last good checkpoint: step_00000004"):
        run_in_process(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_nonfinite_loss_skip_drops_the_step(tmp_path, monkeypatch, dist_info):
    real = moe_model.PureReasonerLM.forward
    calls = []

    def forward(self, *args, **kwargs):  # only step 6's loss is NaN
        out = real(self, *args, **kwargs)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 6 and out.loss is not None else out

    monkeypatch.setattr(moe_model.PureReasonerLM, "forward", forward)
    summary = run_in_process(tmp_path, "train.on_nonfinite=skip")
    rows = metrics(tmp_path)
    assert [int(r["skipped"]) for r in rows] == [0] * 5 + [1] + [0] * 6
    assert all(torch.isfinite(torch.tensor(summary.losses[6:])))
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000012"

"""The GPU check's CPU side: its plan and arguments, and a smoke run of every step the Triton interpreter
can run (tiny fp32 shapes); the CUDA-only steps must be skipped with their reason, never run or passed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pure_reasoner.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
CUDA_ONLY = {"kernel_tests", "sanitizer", "sync_free", "cuda_graph", "device_guard"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run benchmarks/gpu_check.sh itself")


def test_dry_run_prints_the_plan_within_budget(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    steps = {p["step"]: p for p in shown["plan"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert {n for n, p in steps.items() if not p["runs"]} == CUDA_ONLY
    assert all(p["skip_reason"].startswith("CUDA only: ") for n, p in steps.items() if n in CUDA_ONLY)
    assert shown["budget_s"] <= 8 * 60 - 60  # a minute left for installing the extras


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "production,nonsense", "--dry-run"])
    with pytest.raises(SystemExit):  # without CUDA and without --allow-cpu there is nothing to run
        gpu_check.main(["--out", str(tmp_path)])


def test_cpu_smoke_run(tmp_path):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by the root conftest
    assert gpu_check.main(["--allow-cpu", "--out", str(tmp_path)]) == 0
    steps = {s["step"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert {n for n, s in steps.items() if s["status"] == "skipped"} == CUDA_ONLY
    assert {n for n, s in steps.items() if s["status"] == "pass"} == set(steps) - CUDA_ONLY
    errors = steps["production"]["figures"]["max_rel_error"]
    assert set(errors) == {"y", "dx", "dgates", "dw1", "dw3", "dw2"} and max(errors.values()) < 1e-4
    rates = {(r["rate"], r["mode"]) for r in steps["perf"]["figures"]["rows"]}
    assert rates == {(rate, mode) for rate in (0.125, 1.0) for mode in ("fwd", "bwd", "fwd+bwd")}
    assert all(v["bitwise_equal"] for v in steps["determinism"]["figures"]["deterministic=True"].values())


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    """A step whose comparison fails must mark the run failed (exit 1), not pass quietly."""
    def wrong(ctx):
        raise AssertionError("relative error above bound")

    steps = [s if s.name != "determinism" else gpu_check.Step(s.name, s.budget_s, s.cuda_only, wrong)
             for s in gpu_check.STEPS]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    assert gpu_check.main(["--allow-cpu", "--out", str(tmp_path), "--only", "determinism"]) == 1
    (record,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert record["status"] == "fail" and "relative error" in record["error"]


def test_shell_entry_point_dry_run_installs_nothing(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plan"] and not (tmp_path / "out").exists()

"""Smoke run of ``python -m pure_reasoner.benchmarks.hf_experts --quick``: every block, provider and mode lands in the
JSON."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")

from pure_reasoner.benchmarks.hf_experts import MODES, PROVIDERS, QUICK, main  # noqa: E402


def test_quick_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "hf_experts.json"
    main(["--quick", "--repeats", "1", "--json", str(out)])
    assert "transformers MoE blocks by experts implementation" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_model"] and data["dtype"] == "float32"
    got = {(r["arch"], r["provider"], r["mode"]) for r in data["records"]}
    assert got == {(w.arch, p, m) for w in QUICK for p in PROVIDERS for m in MODES}
    assert {w.arch for w in QUICK} == {"qwen2_moe", "qwen3_moe", "olmoe", "mixtral"}
    for r in data["records"]:
        assert r["ms"] > 0 and r["GFLOP/s"] > 0, r
        if r["provider"] == "grouped_mm":
            assert r["vs_grouped_mm"] == 1.0
        want = {"grouped_mm": "grouped_mm", "eager": "mkl (per-expert loop)"}.get(r["provider"])
        assert r["engine"] == want if want else r["engine"]  # ours: the engines chosen on this machine
    assert "grouped" in data["machine"]["gemm_engines"]


def test_bad_repeats_exits_nonzero():
    cmd = [sys.executable, "-m", "pure_reasoner.benchmarks.hf_experts", "--quick", "--repeats", "0"]
    assert subprocess.run(cmd, capture_output=True).returncode != 0

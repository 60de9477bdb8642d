"""Smoke run of ``python -m pure_reasoner.benchmarks.kernels --quick``: every provider and mode lands in the JSON."""

import json
import subprocess
import sys

import pytest

from pure_reasoner.benchmarks.kernels import main
from pure_reasoner.benchmarks.results_md import kernels_markdown


def test_quick_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    main(["--quick", "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "knowledge-path kernels" in printed and "skipped: no CUDA" in printed
    data = json.loads(out.read_text())
    assert set(data["rooflines"]) == {"cpu float32"} and data["machine"]["torch"]
    mlp = {(r["provider"], r["mode"], r["rate"]) for r in data["records"] if r["op"] == "knowledge_mlp"}
    expected = {(p, m, r) for p in ("torch", "reference", "hf_grouped_mm") for m in ("fwd", "bwd", "fwd+bwd")
                for r in (0.125, 1.0)}  # fmt: skip
    assert mlp == expected
    for r in data["records"]:
        assert r["ms"] > 0 and r["roofline_ms"] > 0 and r["x_roofline"] > 0, r
        assert r["op"] == "routing" or r["flops"] > 0
        # Two passes cannot move fewer bytes nor do fewer FLOPs than one: their bound is at least the roofline.
        assert ("x_pass_bound" in r) == (r["mode"] == "fwd+bwd" and r["op"] == "knowledge_mlp"), r
        assert r.get("pass_bound_ms", r["roofline_ms"]) >= r["roofline_ms"] * (1 - 1e-12), r
    # The CPU and the engine each provider ran on are named (kernels.engines chose ours on this machine).
    chosen = data["machine"]["gemm_engines"]
    assert data["machine"]["cpu_model"] and {chosen["grouped"], chosen["grouped_wgrad"]} <= {"mkl", "onednn",
                                                                                              "grouped_mm", "small"}
    engines = {r["provider"]: r["engine"] for r in data["records"] if r["op"] == "knowledge_mlp"}
    assert engines["hf_grouped_mm"] == "grouped_mm" and engines["reference"].startswith("mkl") and engines["torch"]
    table = kernels_markdown(data).splitlines()
    assert table[0].startswith(f"CPU: {data['machine']['cpu_model']}, GEMM engines:")
    roofline = next(t for t in table if t.startswith("roofline"))
    assert "onednn" in roofline and len([t for t in table if t.startswith("| tiny")]) == len(data["records"])


def test_bad_repeats_exits_nonzero():
    cmd = [sys.executable, "-m", "pure_reasoner.benchmarks.kernels", "--quick", "--repeats", "0"]
    assert subprocess.run(cmd, capture_output=True).returncode != 0


@pytest.mark.parametrize("rate", [0.125, 1.0])
def test_hf_baseline_equals_ours(rate):
    """The peer computes the same thing: its sentinel handling of idle slots included."""
    import torch

    from pure_reasoner.benchmarks.kernels import QUICK, check_providers_agree, make_inputs, mlp_providers

    inputs = make_inputs(QUICK, rate, torch.float32, "cpu", seed=1)
    check_providers_agree(mlp_providers(inputs, QUICK, "cpu"), inputs, torch.float32)

"""Benchmark tooling: timing bookkeeping and a roofline measured on this machine."""

import json

import pytest
import torch

from pure_reasoner.benchmarks.common import (
    Roofline,
    measure_roofline,
    peak_memory,
    time_interleaved,
    with_pass_bound,
    write_json,
)


def test_time_interleaved_counts_calls():
    calls = {"a": 0, "b": 0}
    cases = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    timings = time_interleaved(cases, repeats=4, warmup=2)
    assert calls == {"a": 6, "b": 6}
    assert all(t.repeats == 4 and t.min_s <= t.median_s <= t.max_s for t in timings.values())


def test_roofline_is_positive_and_bounds_time(tmp_path):
    roof = measure_roofline(n=256, copy_mb=8, repeats=2)
    assert roof.matmul_gflops > 0 and roof.copy_gbs > 0
    assert roof.time_s(1e9, 0) == 1e9 / (roof.matmul_gflops * 1e9)
    assert roof.time_s(0, 1e9) == 1e9 / (roof.copy_gbs * 1e9)
    write_json(tmp_path / "r.json", [{"x": 1}], roofline={"p": roof.matmul_gflops})
    assert json.loads((tmp_path / "r.json").read_text())["records"] == [{"x": 1}]


def test_pass_bound_reads_the_weights_in_both_passes():
    """A weight-bound case on a machine of 100 GFLOP/s and 10 GB/s: 1 GB of weights read by each pass, 1 GB of
    weight gradients written by the backward. fwd 0.1 s, bwd 0.2 s; the fwd+bwd roofline counts the weights once
    (2 GB, 0.2 s), the passes add up to 0.3 s."""
    roof = Roofline(matmul_gflops=100.0, copy_gbs=10.0)
    cost = {"fwd": (1e9, 1e9), "bwd": (2e9, 2e9), "fwd+bwd": (3e9, 2e9)}
    rows = [{"case": c, "mode": m, "time_s": 0.6, "roofline_s": roof.time_s(*cost[m])}
            for c in ("a", "b") for m in cost if (c, m) != ("b", "bwd")]  # fmt: skip
    out = with_pass_bound(rows, ("case",), "roofline_s", "time_s")
    both = {r["case"]: r for r in out if r["mode"] == "fwd+bwd"}
    assert both["a"]["roofline_s"] == pytest.approx(0.2) and both["a"]["pass_bound_s"] == pytest.approx(0.3)
    assert both["a"]["x_pass_bound"] == pytest.approx(2.0)
    assert "x_pass_bound" not in both["b"] and all("x_pass_bound" not in r for r in out if r["mode"] != "fwd+bwd")
    assert [r["roofline_s"] for r in out] == [r["roofline_s"] for r in rows]  # the roofline itself is kept


def test_setup_runs_untimed_and_feeds_the_case():
    seen = []
    timings = time_interleaved({"a": seen.append}, repeats=3, warmup=1, setup={"a": lambda: len(seen)})
    assert seen == [0, 1, 2, 3] and timings["a"].repeats == 3


def test_setup_for_unknown_case_is_rejected():
    with pytest.raises(ValueError, match="nope"):
        time_interleaved({"a": lambda: None}, setup={"nope": lambda: None})


def test_peak_memory_counts_live_bytes():
    def work():
        a = torch.empty(2**20, dtype=torch.uint8)  # 1 MiB
        b = torch.empty(2**21, dtype=torch.uint8)  # 2 MiB while a is live: peak 3 MiB
        del a
        kept.append(b)

    kept = []
    mem = peak_memory(work)
    assert mem.peak_bytes == 3 * 2**20
    assert mem.retained_bytes == 2**21

"""Benchmark tooling: timing bookkeeping and a roofline measured on this machine."""

import json

from benchmarks.common import measure_roofline, time_interleaved, write_json


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

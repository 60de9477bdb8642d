"""Smoke run of ``python -m pure_reasoner.benchmarks.small_gemm``: every op of every row count lands in the JSON
(what it times is checked against float64 in tests/kernels/test_small_gemm.py)."""

import json

import pytest

from pure_reasoner.benchmarks.small_gemm import main
from pure_reasoner.kernels import small_gemm


@pytest.mark.skipif(small_gemm.compiler() is None, reason="no C++ compiler: the small engine is not offered")
def test_small_run_writes_every_row(tmp_path):
    out = tmp_path / "small_gemm.json"
    main(["--rows", "3,5", "--experts", "2", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_model"]
    assert {(r["rows"], r["op"]) for r in data["records"]} == {(m, op) for m in (3, 5)
                                                               for op in ("x @ w", "dy @ wT", "wgrad")}
    for r in data["records"]:
        assert r["small_ms"] > 0 and r["grouped_mm_ms"] > 0 and r["speedup"] > 0 and r["small_GBps"] > 0

"""Smoke run of benchmarks.threads: its settings start their workers together and the JSON names the machine."""

import json

import pytest

from pure_reasoner.benchmarks import threads


def test_threads_benchmark_smoke(tmp_path):
    out = tmp_path / "threads.json"
    assert threads.main(["--steps", "1", "--batch", "1", "--seq-len", "16", "--settings", "0,5",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_model"] and report["steps"] == 1
    rows = [(r["setting"], r["job"], r["threads"]) for r in report["records"]]
    assert rows == [("alone, 2 threads", 0, 2), ("two jobs, 2 threads and 1 thread", 0, 2),
                    ("two jobs, 2 threads and 1 thread", 1, 1)]
    assert all(r["median_s"] > 0 for r in report["records"])


def test_threads_benchmark_rejects_bad_input():
    with pytest.raises(SystemExit):
        threads.main(["--steps", "0"])

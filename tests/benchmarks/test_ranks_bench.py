"""benchmarks.ranks: its commands, the median it reads off metrics.csv, and bad input refused."""

import sys

import pytest

from pure_reasoner.benchmarks import ranks


def _metrics(run_dir, tokens_per_s):
    run_dir.mkdir()
    lines = ["step,loss,tokens_per_s"] + [f"{i + 1},1.0,{t}" for i, t in enumerate(tokens_per_s)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_median_leaves_out_the_first_steps(tmp_path):
    _metrics(tmp_path / "a", [10.0, 500.0, 3.0, 7.0, 5.0])
    assert ranks.median_tokens_per_s(tmp_path / "a", skip=2) == 5.0  # of 3, 7, 5
    assert ranks.median_tokens_per_s(tmp_path / "a", skip=0) == 7.0
    with pytest.raises(ValueError, match="no step after the first 5"):
        ranks.median_tokens_per_s(tmp_path / "a", skip=5)


def test_commands(tmp_path):
    one = ranks.train_command("u", tmp_path, 40, 4, 1, ["train.threads=1"])
    assert one[:3] == [sys.executable, "-m", "pure_reasoner.train"]
    assert {"experiment=plain", "name=u", f"hydra.run.dir={tmp_path / 'u'}", "train.max_steps=40",
            "train.grad_accum=4", "train.export=false", "train.first_look=0", "train.threads=1"} <= set(one)
    two = ranks.train_command("r", tmp_path, 40, 1, 2, [])
    assert two[0].endswith("deepspeed") and two[two.index("--num_gpus") + 1] == "2"
    assert two[two.index("--module") + 1] == "pure_reasoner.train" and "--no_local_rank" in two


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="--steps 5 must exceed --skip 5"):
        ranks.main(["--steps", "5", "--skip", "5"])
    with pytest.raises(ValueError, match="--variant 'bf16' must be space-separated KEY=VALUE overrides"):
        ranks.main(["--variant", "bf16"])


def test_a_variant_is_one_more_two_rank_run_against_the_same_unit(tmp_path, monkeypatch):
    """measure() with its runs faked: each run's metrics.csv written with a known rate, the ratios checked by hand."""
    rates = {"unit": 100.0, "contended_a": 90.0, "contended_b": 110.0, "one_rank_2_threads": 150.0,
             "two_ranks": 160.0, "variant0": 180.0}
    started = []

    def fake_run_together(commands, threads, log_dir):
        for name, cmd in commands.items():
            started.append((name, cmd))
            _metrics(tmp_path / name, [1.0] + [rates[name.split("-", 1)[1]]] * 3)

    monkeypatch.setattr(ranks, "run_together", fake_run_together)
    record = ranks.measure(4, 1, 1, ["x=1"], tmp_path, ["a=2 b=3"])
    assert record["vs_ideal"] == pytest.approx(200 / 160) and record["vs_contended"] == pytest.approx(200 / 160)
    assert record["variants"] == {"a=2 b=3": {"two_ranks": 180.0, "vs_ideal": pytest.approx(200 / 180),
                                              "vs_contended": pytest.approx(200 / 180)}}
    variant_cmd = dict(started)["ga1-variant0"]
    assert {"x=1", "a=2", "b=3"} <= set(variant_cmd) and "--num_gpus" in variant_cmd

"""The scorecard on hand-made eval reports whose means, intervals and verdicts were worked out by hand."""

import json
import math

import pytest

from pure_reasoner.train.evaluation.scorecard import (
    DEFAULT_TARGETS,
    METRICS,
    Target,
    load_targets,
    main,
    read_runs,
    score,
)

T_975_DF2 = 4.302652729749464  # Student t, 97.5th percentile, 2 degrees of freedom (tables: 4.303)
T_975_DF1 = 12.706204736174707  # 1 degree of freedom (tables: 12.706)


def _split(**by_ablation):
    return {a: {"acc_adjusted": v, "n": 600} for a, v in by_ablation.items()}


def _report(closed, closed_off, open_, open_off, two_hop=None, mean=None, faith=None, routing=None, run=None,
            stream=None):
    mean_ablation = {"knowledge_mean": mean} if mean is not None else {}
    closed_book = _split(base=closed, knowledge_off=closed_off, **mean_ablation)
    splits = {"closed_book": closed_book, "open_book": _split(base=open_, knowledge_off=open_off)}
    if two_hop is not None:
        splits["open_book_two_hop"] = _split(base=two_hop[0], knowledge_off=two_hop[1])
    report = {"splits": splits}
    if faith is not None:
        report["faithfulness"] = {"base": {"choice": {"faithfulness": faith}}}
    if routing is not None:
        answer_rate, other_rate, target = routing
        report["routing"] = {"closed_book": {"answer_rate": answer_rate, "other_rate": other_rate,
                                             "ratio": answer_rate / other_rate, "answer_tokens": 100,
                                             "other_tokens": 900, "target_rate": target}}
    if stream is not None:  # the overall consult rate on the training stream, and its target
        report.setdefault("routing", {})["train_stream"] = {"rate": stream[0], "target_rate": stream[1]}
    if run is not None:
        report["run"] = run
    return report


@pytest.fixture
def reports(tmp_path):
    """dense: closed 0.40 / 0.50 / 0.60 (seed mean 0.50). reasoner (its recipe and seeds in each report's ``run``
    record, the file names say nothing): seeds 0, 1, 2 as below. topk: two seeds named by the file stem."""
    files = []

    def put(name, report):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report))
        files.append(str(path))

    for seed, closed in enumerate((0.40, 0.50, 0.60)):
        put(f"dense_seed{seed}", _report(closed, closed, 0.5, 0.5))
    reasoner = [  # closed, off, open, open off, two-hop (base, off), mean ablation, faithfulness, routing
        (0.50, 0.02, 0.70, 0.70, (0.5, 0.49), 0.068, 0.95, (0.6, 0.1, 0.15)),
        (0.48, 0.06, 0.80, 0.78, (0.5, 0.40), 0.123, 0.92, (0.5, 0.1, 0.14)),
        (0.55, 0.04, 0.62, 0.62, None, 0.167, 0.91, (0.4, 0.2, 0.20)),
    ]
    streams = [(0.125, 0.125), (0.10, 0.125), (0.16, 0.125)]  # the training stream's rate, target
    for seed, (c, co, o, oo, th, m, f, r) in enumerate(reasoner):
        put(f"r{seed}", _report(c, co, o, oo, th, m, f, r, run={"recipe": "reasoner", "seed": seed,
                                                               "heldout": seed == 2}, stream=streams[seed]))
    for seed in (0, 1):
        put(f"topk_seed{seed}", _report(0.3 + 0.1 * seed, 0.2, 0.5, 0.5))
    return files


def _rows(card, recipe):
    (entry,) = [r for r in card if r["recipe"] == recipe]
    return {row["metric"]: row for row in entry["targets"]}, entry


def test_hand_computed_scorecard(reports):
    card = score(read_runs(reports), load_targets(DEFAULT_TARGETS))
    assert [r["recipe"] for r in card] == ["dense", "reasoner", "topk"]
    rows, entry = _rows(card, "reasoner")
    assert entry["seeds"] == [0, 1, 2] and entry["heldout_seeds"] == [2]

    # closed book / dense seed mean 0.50: 1.00, 0.96, 1.10 -> mean 1.02, s = sqrt(0.0104 / 2) = 0.072111
    closed = rows["closed_book_adjusted"]
    assert closed["values"] == pytest.approx([1.00, 0.96, 1.10])
    assert closed["mean"] == pytest.approx(1.02)
    assert closed["ci95"] == pytest.approx(T_975_DF2 * 0.0721110255 / math.sqrt(3))  # 0.17913
    assert closed["ci95"] == pytest.approx(0.17913, abs=1e-5)
    assert (closed["worst_seed"], closed["verdict"]) == (1, "met")

    # knowledge off, closed: 0.02, 0.06, 0.04 -> mean 0.04 ± 4.3027 * 0.02 / sqrt(3) = 0.04968; seed 1 > 0.05
    off = rows["knowledge_off_closed_adjusted"]
    assert off["mean"] == pytest.approx(0.04) and off["ci95"] == pytest.approx(0.049683, abs=1e-6)
    assert (off["worst_seed"], off["worst"], off["verdict"]) == (1, pytest.approx(0.06), "not met")

    # open book kept: 0.70/0.70, 0.78/0.80, 0.62/0.62 = 1, 0.975, 1 -> met; worst seed 1
    kept = rows["open_book_kept"]
    assert kept["values"] == pytest.approx([1.0, 0.975, 1.0]) and (kept["worst_seed"], kept["verdict"]) == (1, "met")
    assert kept["mean"] == pytest.approx(0.991667, abs=1e-6)
    assert kept["ci95"] == pytest.approx(T_975_DF2 * 0.0144337567 / math.sqrt(3))  # s of (1, .975, 1)
    # single-hop open book base: 0.70, 0.80, 0.62 >= 0.6 -> met, worst seed 2
    assert (rows["open_book_adjusted"]["worst_seed"], rows["open_book_adjusted"]["verdict"]) == (2, "met")
    # two-hop: seed 2 has no such split
    assert rows["open_book_two_hop_kept"]["verdict"] == "not measured"
    assert "[2]" in rows["open_book_two_hop_kept"]["why"] and rows["open_book_two_hop_kept"]["mean"] is None

    # mean ablation share: (0.50-0.068)/0.48 = 0.9, (0.48-0.123)/0.42 = 0.85, (0.55-0.167)/0.51 = 0.75098
    share = rows["mean_ablation_share"]
    assert share["values"] == pytest.approx([0.9, 0.85, 0.750980], abs=1e-6)
    assert (share["worst_seed"], share["verdict"]) == (2, "not met")

    faith = rows["faithfulness"]
    assert faith["mean"] == pytest.approx(0.926667, abs=1e-6) and faith["verdict"] == "met"
    # consult: answer rates 0.6, 0.5, 0.4 (seed 2 < 0.5); ratios 6, 5, 2 (seed 2 < 3)
    assert (rows["recall_consult_rate"]["worst_seed"], rows["recall_consult_rate"]["verdict"]) == (2, "not met")
    assert rows["recall_consult_ratio"]["values"] == pytest.approx([6.0, 5.0, 2.0])
    # overall rate (100 answer + 900 other tokens): 0.15 / 0.15, 0.14 / 0.14, (40 + 180) / 1000 = 0.22 / 0.20
    assert METRICS["consult_rate_error"](read_runs(reports[3:4])[0].report) == pytest.approx(0.0, abs=1e-9)
    assert METRICS["consult_rate_error"](read_runs(reports[5:6])[0].report) == pytest.approx(0.1, abs=1e-9)
    # the target is on the training stream: 0.125 / 0.125, 0.10 / 0.125, 0.16 / 0.125 -> errors 0, 0.2, 0.28
    error = rows["stream_consult_rate_error"]
    assert error["values"] == pytest.approx([0.0, 0.2, 0.28], abs=1e-9) and error["verdict"] == "not met"
    assert error["worst_seed"] == 2 and "consult_rate_error" not in rows

    dense, _ = _rows(card, "dense")
    assert dense["closed_book_adjusted"]["values"] == pytest.approx([0.8, 1.0, 1.2])
    assert dense["closed_book_adjusted"]["verdict"] == "not met"  # seed 0 is 0.8 of the mean
    assert dense["recall_consult_rate"]["verdict"] == "not measured"  # no routing record: a dense model

    # two seeds: t with 1 df; closed / dense mean: 0.6, 0.8 -> mean 0.7 ± 12.706 * 0.141421 / sqrt(2) = 1.27062
    topk, entry = _rows(card, "topk")
    assert entry["seeds"] == [0, 1]
    assert topk["closed_book_adjusted"]["ci95"] == pytest.approx(T_975_DF1 * 0.1, rel=1e-6)
    assert topk["closed_book_adjusted"]["why"] == "fewer than 3 seeds"


def test_baseline_and_heldout_options(reports, tmp_path, capsys):
    assert main([*reports, "--exclude-heldout", "--baseline", "topk", "--json", str(tmp_path / "card.json")]) == 0
    out = capsys.readouterr().out
    card = json.loads((tmp_path / "card.json").read_text())["recipes"]
    rows, entry = _rows(card, "reasoner")
    assert entry["seeds"] == [0, 1]  # seed 2 ran on the held-out world
    assert rows["closed_book_adjusted"]["values"] == pytest.approx([0.50 / 0.35, 0.48 / 0.35])
    assert "| reasoner (0, 1) | knowledge off forgets closed book | knowledge_off_closed_adjusted |" in out
    assert "| 0.040 ± 0.254 | 0.060 (seed 1) | <= 0.05 | not met (fewer than 3 seeds) |" in out  # 12.706*.02/√2
    card = score(read_runs(reports), load_targets(DEFAULT_TARGETS), baseline="nonesuch")
    assert _rows(card, "reasoner")[0]["closed_book_adjusted"]["verdict"] == "not measured"


def test_manifest_names_recipe_and_seed(tmp_path):
    path = tmp_path / "anything.json"
    path.write_text(json.dumps(_report(0.5, 0.0, 0.7, 0.7)))
    (run,) = read_runs([path], {"anything": {"recipe": "forget", "seed": 4}})
    assert (run.recipe, run.seed) == ("forget", 4)
    (run,) = read_runs([path])
    assert (run.recipe, run.seed) == ("anything", 0)
    with pytest.raises(ValueError, match="seed 0 twice"):
        read_runs([path, path])


def test_bad_targets_and_reports(tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'telepathy'"):
        Target("x", "telepathy", ">=", 1.0)
    with pytest.raises(ValueError, match="op must be one of"):
        Target("x", "faithfulness", ">", 1.0)
    bad = tmp_path / "t.yaml"
    bad.write_text("targets:\n  - {name: a, metric: faithfulness, op: '>=', threshold: high}\n")
    with pytest.raises(ValueError, match=r"t.yaml: targets\[0\]: target 'a': threshold must be a number"):
        load_targets(bad)
    report = tmp_path / "r.json"
    report.write_text("{}")
    with pytest.raises(ValueError, match="no 'splits'"):
        read_runs([report])
    assert main([str(report)]) == 2


def test_paired_baseline_divides_by_the_same_world(reports, tmp_path, capsys):
    # dense closed 0.40 / 0.50 / 0.60 on worlds 0 / 1 / 2; reasoner 0.50 / 0.48 / 0.55 on the same worlds:
    # 1.25, 0.96, 0.91667 (against 1.00, 0.96, 1.10 by dense's seed mean)
    card = score(read_runs(reports), load_targets(DEFAULT_TARGETS), paired=True)
    closed = _rows(card, "reasoner")[0]["closed_book_adjusted"]
    assert closed["values"] == pytest.approx([1.25, 0.96, 0.55 / 0.60])
    assert closed["paired"] and (closed["worst_seed"], closed["verdict"]) == (2, "not met")
    # topk's seeds 0, 1 pair with dense's worlds 0, 1: 0.30 / 0.40, 0.40 / 0.50
    assert _rows(card, "topk")[0]["closed_book_adjusted"]["values"] == pytest.approx([0.75, 0.8])
    # a run on a world the baseline never ran on (its run record names world 9): not measured, the world named
    path = tmp_path / "far.json"
    path.write_text(json.dumps(_report(0.5, 0.0, 0.7, 0.7, run={"recipe": "far", "seed": 0, "world_seed": 9})))
    card = score(read_runs([*reports, str(path)]), load_targets(DEFAULT_TARGETS), paired=True)
    far = _rows(card, "far")[0]["closed_book_adjusted"]
    assert far["verdict"] == "not measured" and "worlds [9]" in far["why"]
    # two baseline seeds on one world average: dense seeds 0 and 3 both on world 0 (0.40 and 0.20 -> 0.30)
    extra = tmp_path / "dense_extra.json"
    extra.write_text(json.dumps(_report(0.20, 0.20, 0.5, 0.5, run={"recipe": "dense", "seed": 3, "world_seed": 0})))
    card = score(read_runs([*reports, str(extra)]), load_targets(DEFAULT_TARGETS), paired=True)
    assert _rows(card, "reasoner")[0]["closed_book_adjusted"]["values"][0] == pytest.approx(0.50 / 0.30)
    assert main([*reports, "--paired"]) == 0
    assert "closed_book_adjusted / dense same world | 1.042 ±" in capsys.readouterr().out  # (1.25+.96+.91667)/3

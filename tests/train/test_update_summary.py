"""Knowledge-update reports pooled over update seeds (``train.update_summary``), against scipy's intervals."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from pure_reasoner.train import update_summary


def _report(new_acc: float, pretrained_adjusted: float, retained: float | None, delta: float, within: bool) -> dict:
    """A ``train.update_eval`` report with 100 one-hop new-people questions at chance 0.25."""
    new_adjusted = (new_acc - 0.25) / 0.75
    ratio = new_adjusted / pretrained_adjusted if pretrained_adjusted > 0 else None
    return {
        "splits": {"new_people": {"after": {"n": 100, "acc": new_acc, "chance": 0.25}},
                   "closed_book": {"before": {"acc_adjusted": pretrained_adjusted}}},
        "new": {"new_people": {"vs_pretrained": ratio}},
        "retained": {"closed_book": {"relative": retained}},
        "reading": {"open_book": {"delta": delta, "within_ci": within}},
        "update": {"seed": 1},
    }


REPORTS = [_report(0.60, 0.5, 0.95, -0.02, True), _report(0.70, 0.6, None, -0.04, False)]


def test_new_people_are_pooled_over_questions_with_scipys_wilson_interval():
    new = update_summary.summarize(REPORTS, ["a", "b"])["new"]["new_people"]
    assert (new["correct"], new["n"]) == (130, 200)
    assert new["acc_adjusted"] == pytest.approx((0.65 - 0.25) / 0.75)
    assert new["pretrained_acc_adjusted"] == pytest.approx(0.55)
    assert new["vs_pretrained"] == pytest.approx((0.40 / 0.75) / 0.55)
    ci = stats.binomtest(130, 200).proportion_ci(confidence_level=0.95, method="wilson")
    expected = [((bound - 0.25) / 0.75) / 0.55 for bound in (ci.low, ci.high)]
    assert new["vs_pretrained_interval"] == pytest.approx(expected, abs=1e-4)  # scipy's z is 1.95996, ours 1.96
    own = [(0.35 / 0.75) / 0.5, (0.45 / 0.75) / 0.6]
    low, high = stats.t.interval(0.95, 1, loc=sum(own) / 2, scale=stats.sem(own))
    assert new["per_report"]["mean"] == pytest.approx(sum(own) / 2)
    assert new["per_report"]["half_width"] == pytest.approx((high - low) / 2)
    assert new["per_report"]["min"] == pytest.approx(own[0])


def test_no_ratio_without_recall_before():
    reports = [_report(0.60, 0.0, 0.95, -0.02, True)]  # no ratio in the report either, as train.update_eval writes it
    new = update_summary.summarize(reports, ["a"])["new"]["new_people"]
    assert new["vs_pretrained"] is None and new["vs_pretrained_interval"] is None and new["per_report"] is None
    assert "no ratio (no recall before)" in update_summary.render(update_summary.summarize(reports, ["a"]))


def test_retained_and_reading_summarize_the_reports_values():
    summary = update_summary.summarize(REPORTS, ["a", "b"])
    assert summary["retained"]["closed_book"]["values"] == [0.95]  # a report with no ratio is left out
    assert summary["retained"]["closed_book"]["half_width"] is None
    reading = summary["reading"]["open_book"]
    assert reading["mean"] == pytest.approx(-0.03) and reading["min"] == pytest.approx(-0.04)
    assert reading["within_ci"] == 1


@pytest.mark.parametrize("content, match", [("{not json", "not a readable JSON report"),
                                            ("[1, 2]", "not an update report \\(a JSON object\\)"),
                                            ('{"splits": {}}', "no new, retained, reading")])
def test_bad_reports_exit_2_and_write_nothing(tmp_path, capsys, content, match):
    bad, out = tmp_path / "bad.json", tmp_path / "summary.json"
    bad.write_text(content)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(REPORTS[0]))
    assert update_summary.main([str(good), str(bad), "--json", str(out)]) == 2
    assert match.replace("\\", "") in capsys.readouterr().err
    assert not out.exists()


def test_cli_writes_the_summary(tmp_path, capsys):
    paths = []
    for i, report in enumerate(REPORTS):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "nested" / "summary.json"
    assert update_summary.main([*map(str, paths), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["new"]["new_people"]["n"] == 200
    assert "130/200 right" in capsys.readouterr().out

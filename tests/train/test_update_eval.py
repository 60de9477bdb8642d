"""The update report (train.update_eval.compare) on hand-made answers whose figures are worked out by hand."""

import pytest

from pure_reasoner.train.update_eval import compare, render, split_scores


def _ex(answer: str, choices=("a", "b", "c", "d"), memorised: str = "", person: str = "p") -> dict:
    return {"answer": answer, "choices": list(choices), "memorised": memorised, "person": person}


EXAMPLES = {
    # 4 questions, 4 choices each: chance 0.25
    "new_people": [_ex("a"), _ex("b"), _ex("c"), _ex("d")],
    "changed": [_ex("a", memorised="b"), _ex("c", memorised="d")],
    "closed_book": [_ex("a"), _ex("b"), _ex("c"), _ex("d")],
    "open_book": [_ex("a")] * 10,
}
BEFORE = {
    "new_people": ["b", "a", "a", "a"],  # 0 right
    "changed": ["b", "d"],  # both the old value
    "closed_book": ["a", "b", "c", "a"],  # 3 right: adjusted (0.75 - 0.25) / 0.75 = 2/3
    "open_book": ["a"] * 8 + ["b"] * 2,  # 0.8
}
AFTER = {
    "new_people": ["a", "b", "c", "a"],  # 3 right: adjusted 2/3, as closed_book before: ratio 1
    "changed": ["a", "d"],  # one new value, one old
    "closed_book": ["a", "b", "d", "d"],  # 3 right, but only 2 of the 3 known before kept
    "open_book": ["a"] * 7 + ["b"] * 3,  # 0.7: inside the Wilson interval of 8/10 ([0.49, 0.94])
}


def test_split_scores_by_hand():
    s = split_scores(EXAMPLES["changed"], AFTER["changed"])
    assert (s["n"], s["acc"], s["chance"], s["memorised"]) == (2, 0.5, 0.25, 0.5)
    assert s["acc_adjusted"] == pytest.approx(1 / 3)
    assert split_scores(EXAMPLES["new_people"], BEFORE["new_people"])["memorised"] is None
    with pytest.raises(ValueError, match="one prediction per example"):
        split_scores(EXAMPLES["changed"], ["a"])


def test_compare_by_hand():
    report = compare(EXAMPLES, BEFORE, AFTER)
    new = report["new"]["new_people"]
    assert new["acc_adjusted"] == pytest.approx(2 / 3) and new["pretrained_acc_adjusted"] == pytest.approx(2 / 3)
    assert new["vs_pretrained"] == pytest.approx(1.0)
    assert report["changed"] == {"before": {"acc": 0.0, "memorised": 1.0}, "after": {"acc": 0.5, "memorised": 0.5}}
    retained = report["retained"]["closed_book"]
    assert retained["relative"] == pytest.approx(1.0)
    assert retained["kept"] == pytest.approx(2 / 3) and retained["known_before"] == 3
    reading = report["reading"]["open_book"]
    assert reading["delta"] == pytest.approx(-0.1) and reading["within_ci"] is True
    assert report["targets"] == {"new_vs_pretrained>=0.9": True, "retained>=0.9": True, "reading_within_ci": True}
    assert "new_people" in render(report) and "OUTSIDE" not in render(report)


def test_targets_fail_when_the_update_forgets_or_stops_reading():
    after = {**AFTER, "closed_book": ["a", "a", "a", "a"],  # 1 right: adjusted 0
             "open_book": ["a"] * 3 + ["b"] * 7}  # 0.3: outside [0.49, 0.94]
    report = compare(EXAMPLES, BEFORE, after)
    assert report["retained"]["closed_book"]["relative"] == pytest.approx(0.0)
    assert report["reading"]["open_book"]["within_ci"] is False
    assert report["targets"]["retained>=0.9"] is False and report["targets"]["reading_within_ci"] is False
    assert "OUTSIDE" in render(report)


def test_no_knowledge_before_gives_no_ratio():
    before = {**BEFORE, "closed_book": ["b", "a", "a", "a"]}  # 0 right: adjusted -1/3
    report = compare(EXAMPLES, before, AFTER)
    assert report["new"]["new_people"]["vs_pretrained"] is None
    assert report["retained"]["closed_book"]["relative"] is None and report["retained"]["closed_book"]["kept"] is None
    assert report["targets"]["new_vs_pretrained>=0.9"] is False


def test_changed_elements_counts_what_was_set_by_hand():
    import torch

    from pure_reasoner.train.update_eval import changed_elements

    torch.manual_seed(0)
    before = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    after = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    after.load_state_dict(before.state_dict())
    assert changed_elements(before, after) == {}
    with torch.no_grad():
        after[0].weight[0, :2] += 1.0  # 2 elements
        after[1].bias.copy_(before[1].bias + 0.5)  # all 2 elements
    assert changed_elements(before, after) == {"0.weight": 2, "1.bias": 2}
    with pytest.raises(ValueError, match="not one architecture"):
        changed_elements(before, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)))

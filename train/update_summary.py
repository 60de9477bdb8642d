"""Knowledge updates over several update seeds (or worlds), pooled: ``python -m pure_reasoner.train.update_summary
REPORT.json [REPORT.json ...] [--json OUT]``.

One update report (``train.update_eval``) asks about one batch of new people: with 40 of them its one-hop new-people
split holds about 100 questions, a 95% interval of about +-0.1 on their accuracy, +-0.2x on the ratio to pretraining.
Several updates of the same setting, each its own update seed (other new people, other changed facts), tell the
setting apart from that noise. Per target of ``train.update_eval``:

    new:       the one-hop new people's questions of every report pooled (correct answers and questions summed;
               the chance level the questions' mean), their chance-adjusted accuracy over the question-weighted
               mean of the reports' pretraining accuracy (``closed_book`` before the update): ``vs_pretrained``,
               with the 95% Wilson interval of the pooled accuracy carried through the same ratio (the
               pretraining accuracy, 500-600 questions per world, taken as fixed); and the reports' own ratios
               (mean, Student-t half-width). Two-hop alike.
    retained:  per retained split, the reports' ``relative`` (mean, half-width, worst).
    reading:   per reading split, the reports' accuracy change (mean, half-width, worst) and how many of them stay
               within the 95% interval before.

Reports of several worlds can be pooled the same way (each ratio is to its own base); the summary lists the reports
and their update settings (``update``: seed, new people, changed facts, replay).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pure_reasoner.train.evaluation import scores as em
from pure_reasoner.train.evaluation.scorecard import t_interval
from pure_reasoner.train.update_eval import PRETRAINED_FOR, TARGET_NEW_RATIO, TARGET_RETAINED


def _spread(values: Sequence[float]) -> dict:
    mean, half = t_interval(values)
    return {"mean": mean, "half_width": half, "min": min(values), "max": max(values), "values": list(values)}


def pooled_new(reports: Sequence[dict], split: str) -> dict:
    """``split``'s after-update answers pooled over ``reports`` against their pretraining accuracy (docstring)."""
    parts = [(r["splits"][split]["after"], r["splits"][PRETRAINED_FOR[split]]["before"]) for r in reports]
    n = sum(after["n"] for after, _ in parts)
    correct = sum(round(after["acc"] * after["n"]) for after, _ in parts)
    chance = sum(after["chance"] * after["n"] for after, _ in parts) / n
    pretrained = sum(before["acc_adjusted"] * after["n"] for after, before in parts) / n
    adjusted = em.chance_adjusted(correct / n, chance)
    ratio, interval = None, None  # no knowledge before: no ratio (as train.update_eval)
    if pretrained > 0:
        ratio = adjusted / pretrained
        interval = [em.chance_adjusted(a, chance) / pretrained for a in em.wilson_interval(correct, n)]
    own = [r["new"][split]["vs_pretrained"] for r in reports if r["new"][split]["vs_pretrained"] is not None]
    return {"n": n, "correct": correct, "chance": chance, "acc_adjusted": adjusted,
            "pretrained_acc_adjusted": pretrained, "vs_pretrained": ratio, "vs_pretrained_interval": interval,
            "per_report": _spread(own) if own else None}


def summarize(reports: Sequence[dict], names: Sequence[str]) -> dict:
    """The pooled summary of update ``reports`` (``train.update_eval`` JSONs) named ``names``."""
    if not reports:
        raise ValueError("no update report to summarize")
    for name, report in zip(names, reports, strict=True):
        if not isinstance(report, dict):
            raise ValueError(f"{name}: not an update report (a JSON object)")
        missing = [k for k in ("splits", "new", "retained", "reading") if k not in report]
        if missing:
            raise ValueError(f"{name}: not an update report (no {', '.join(missing)})")
    common = set.intersection(*(set(r["splits"]) for r in reports))
    new = {s: pooled_new(reports, s) for s in PRETRAINED_FOR if s in common and PRETRAINED_FOR[s] in common}
    relative = {s: [r["retained"][s]["relative"] for r in reports if r["retained"][s]["relative"] is not None]
                for s in set.intersection(*(set(r["retained"]) for r in reports))}
    retained = {s: _spread(values) for s, values in relative.items() if values}
    reading = {s: {**_spread([r["reading"][s]["delta"] for r in reports]),
                   "within_ci": sum(r["reading"][s]["within_ci"] for r in reports)}
               for s in set.intersection(*(set(r["reading"]) for r in reports))}
    return {"reports": list(names), "updates": [r.get("update") for r in reports], "new": new,
            "retained": dict(sorted(retained.items())), "reading": dict(sorted(reading.items()))}


def _half(x: float | None) -> str:
    return "" if x is None else f" +- {x:.2f}"


def render(summary: dict) -> str:
    """A short text table of the summary."""
    count = len(summary["reports"])
    lines = [f"{count} update reports pooled"]
    for split, r in summary["new"].items():
        ratio, own = "no ratio (no recall before)", r["per_report"]
        if r["vs_pretrained"] is not None:
            low, high = r["vs_pretrained_interval"]
            ratio = f"x{r['vs_pretrained']:.2f} [{low:.2f}, {high:.2f}] (target >= {TARGET_NEW_RATIO})"
        per_report = "" if own is None else f"; per report x{own['mean']:.2f}{_half(own['half_width'])}, worst " \
                                            f"x{own['min']:.2f}"
        lines.append(f"new ({split}): {r['correct']}/{r['n']} right, adjusted {r['acc_adjusted']:+.3f} vs "
                     f"pretraining {r['pretrained_acc_adjusted']:+.3f}: {ratio}{per_report}")
    for split, r in summary["retained"].items():
        lines.append(f"retained ({split}): x{r['mean']:.2f}{_half(r['half_width'])}, worst x{r['min']:.2f} "
                     f"(target >= {TARGET_RETAINED})")
    for split, r in summary["reading"].items():
        lines.append(f"reading ({split}): {r['mean']:+.3f}{_half(r['half_width'])}, worst {r['min']:+.3f}; "
                     f"{r['within_ci']} of {count} within the 95% interval before")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.update_summary",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="train.update_eval JSON reports")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    try:
        loaded = []
        for path in args.reports:
            try:
                loaded.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: not a readable JSON report ({err})") from err
        summary = summarize(loaded, [str(p) for p in args.reports])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json is not None:
        from pure_reasoner.moe.checkpoint import write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(summary, indent=2))
    print(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The science scorecard: per recipe, each target metric over seeds, the worst seed, met / not met.

    python -m pure_reasoner.train.evaluation.scorecard results/eval/*.json [--targets conf/scorecard/science.yaml]
                              [--runs results/runs.json] [--baseline dense] [--paired] [--exclude-heldout]
                              [--json OUT]

Runs are grouped by recipe, one eval report (``python -m pure_reasoner.train.evaluation --json``) per seed. A report's
recipe and seed come from its ``run`` record (``train.protocol`` writes it), else from the manifest entry of its file
stem (``--runs``), else from the stem itself: ``<recipe>_seed<k>`` (``<recipe>`` alone is seed 0).

Per target: the metric's mean over seeds with a 95% Student-t confidence interval (mean ± t(0.975, n-1) · s / √n,
s the sample standard deviation; none for a single seed), the worst seed (the lowest for a ``>=`` target, the
highest for ``<=``) and the verdict: met when every seed meets the threshold, "not measured" when a report lacks
what the metric needs. The targets are a typed table (``Target``) read from YAML.

A relative target divides each seed's metric by the baseline recipe's seed mean (the targets' definition), or with
``--paired`` by the baseline's value on the same world (a report's ``run.world_seed``, else its seed): the
comparison that removes how hard each world is, for worlds the baseline ran on (the others are "not measured").
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pure_reasoner.train.evaluation import scores as em

DEFAULT_TARGETS = Path(__file__).resolve().parents[2] / "conf" / "scorecard" / "science.yaml"
OPS = (">=", "<=")
MIN_SEEDS = 3


def _acc(report: dict, split: str, ablation: str) -> float | None:
    return ((report.get("splits") or {}).get(split) or {}).get(ablation, {}).get("acc_adjusted")


def _kept(report: dict, split: str) -> float | None:
    """Share of the chance-adjusted accuracy that knowledge off keeps (None when the base is at or below chance)."""
    base, off = _acc(report, split, "base"), _acc(report, split, "knowledge_off")
    return None if base is None or off is None or base <= 0 else off / base


def _mean_ablation_share(report: dict) -> float | None:
    """Closed-book accuracy the mean ablation removes, as a share of what knowledge off removes."""
    base, off, mean = (_acc(report, "closed_book", a) for a in ("base", "knowledge_off", "knowledge_mean"))
    if None in (base, off, mean) or base - off <= 0:
        return None
    return (base - mean) / (base - off)


def _faithfulness(report: dict) -> float | None:
    return (((report.get("faithfulness") or {}).get("base") or {}).get("choice") or {}).get("faithfulness")


def _routing(report: dict) -> dict:
    return (report.get("routing") or {}).get("closed_book") or {}


def _consult_rate_error(report: dict) -> float | None:
    """|overall consult rate / target rate - 1| on the closed-book questions (all their tokens). The rate is of
    tokens that consult any expert: the router's target for the gate mechanism; for null experts an upper bound
    of the slot rate the target holds."""
    r = _routing(report)
    keys = ("answer_rate", "other_rate", "answer_tokens", "other_tokens", "target_rate")
    if any(r.get(k) is None for k in keys) or not r["target_rate"] or not r["answer_tokens"] + r["other_tokens"]:
        return None
    overall = (r["answer_rate"] * r["answer_tokens"] + r["other_rate"] * r["other_tokens"]) / (
        r["answer_tokens"] + r["other_tokens"])
    return abs(overall / r["target_rate"] - 1)


def _stream_consult_rate_error(report: dict) -> float | None:
    """|overall consult rate / target rate - 1| on the run's own training stream after its last step
    (``routing.train_stream``, written by ``train.evaluation.stream_rate``): the population the router's target
    is set on."""
    r = (report.get("routing") or {}).get("train_stream") or {}
    if r.get("rate") is None or not r.get("target_rate"):
        return None
    return abs(r["rate"] / r["target_rate"] - 1)


# metric name -> value of one eval report (None: the report does not record what it needs)
METRICS: dict[str, Callable[[dict], float | None]] = {
    "closed_book_adjusted": lambda r: _acc(r, "closed_book", "base"),
    "knowledge_off_closed_adjusted": lambda r: _acc(r, "closed_book", "knowledge_off"),
    "open_book_adjusted": lambda r: _acc(r, "open_book", "base"),
    "open_book_kept": lambda r: _kept(r, "open_book"),
    "open_book_two_hop_kept": lambda r: _kept(r, "open_book_two_hop"),
    "mean_ablation_share": _mean_ablation_share,
    "faithfulness": _faithfulness,
    "recall_consult_rate": lambda r: _routing(r).get("answer_rate"),
    "recall_consult_ratio": lambda r: _routing(r).get("ratio"),
    "consult_rate_error": _consult_rate_error,
    "stream_consult_rate_error": _stream_consult_rate_error,
}


@dataclass(frozen=True)
class Target:
    """One row of the targets table: ``metric op threshold`` on every seed (``relative_to``: "baseline" divides
    the metric by the baseline recipe's seed mean first)."""

    name: str
    metric: str
    op: str
    threshold: float
    relative_to: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"target {self.name!r}: unknown metric {self.metric!r}; choose from {sorted(METRICS)}")
        if self.op not in OPS:
            raise ValueError(f"target {self.name!r}: op must be one of {OPS}, got {self.op!r}")
        if self.relative_to not in (None, "baseline"):
            raise ValueError(f"target {self.name!r}: relative_to must be 'baseline' or absent, "
                             f"got {self.relative_to!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"target {self.name!r}: threshold must be a number, got {self.threshold!r}")

    def meets(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


@dataclass(frozen=True)
class Targets:
    targets: tuple[Target, ...]
    baseline: str | None = None


def load_targets(path: str | Path) -> Targets:
    """The targets table of a YAML file ``{baseline: RECIPE, targets: [{name, metric, op, threshold,
    relative_to?}, ...]}``. Raises ValueError naming the file and the bad entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read targets {path}: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("targets"), list) or not raw["targets"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'targets' list")
    unknown = set(raw) - {"baseline", "targets"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    targets = []
    for i, entry in enumerate(raw["targets"]):
        try:
            targets.append(Target(**entry))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: targets[{i}]: {err}") from err
    return Targets(tuple(targets), raw.get("baseline"))


@dataclass(frozen=True)
class Run:
    recipe: str
    seed: int
    path: str
    report: dict
    heldout: bool = False
    world_seed: int | None = None  # the world it ran on (None: its seed)

    @property
    def world(self) -> int:
        return self.seed if self.world_seed is None else self.world_seed


_SEED_SUFFIX = re.compile(r"^(?P<recipe>.+)_seed(?P<seed>\d+)$")


def read_runs(paths: Sequence[str | Path], manifest: dict | None = None) -> list[Run]:
    """One Run per eval report, its recipe and seed from its ``run`` record, the manifest or its file stem."""
    runs = []
    for path in map(Path, paths):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable eval report ({err})") from err
        if not isinstance(report, dict) or "splits" not in report:
            raise ValueError(f"{path}: not a train.evaluation.evaluate report (no 'splits')")
        record = report.get("run") or (manifest or {}).get(path.stem) or {}
        match = _SEED_SUFFIX.match(path.stem)
        recipe = record.get("recipe") or (match["recipe"] if match else path.stem)
        seed = record.get("seed", int(match["seed"]) if match else 0)
        world = record.get("world_seed")
        runs.append(Run(recipe, int(seed), str(path), report, bool(record.get("heldout", False)),
                        None if world is None else int(world)))
    seen: dict[tuple[str, int], str] = {}
    for run in runs:
        if (run.recipe, run.seed) in seen:
            raise ValueError(f"recipe {run.recipe!r} seed {run.seed} twice: {seen[run.recipe, run.seed]} and "
                             f"{run.path}")
        seen[run.recipe, run.seed] = run.path
    return runs


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the two-sided Student-t interval); half-width None for fewer than 2 values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    from scipy.stats import t

    return mean, float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def score(runs: Sequence[Run], targets: Targets, baseline: str | None = None, paired: bool = False) -> list[dict]:
    """Per recipe (in first-seen order), per target: seeds, values, mean, ci, worst seed and verdict (``paired``:
    relative targets divide by the baseline on the same world, not by its seed mean)."""
    baseline = baseline or targets.baseline
    recipes: dict[str, list[Run]] = {}
    for run in runs:
        recipes.setdefault(run.recipe, []).append(run)
    out = []
    for recipe, members in recipes.items():
        members = sorted(members, key=lambda r: r.seed)
        rows = []
        for target in targets.targets:
            values = [METRICS[target.metric](r.report) for r in members]
            row = {"target": target.name, "metric": target.metric, "op": target.op, "threshold": target.threshold,
                   "relative_to": baseline if target.relative_to else None,
                   "paired": bool(target.relative_to) and paired, "seeds": [r.seed for r in members],
                   "values": values, "mean": None, "ci95": None, "worst_seed": None, "worst": None}
            if target.relative_to:
                base = recipes.get(baseline or "") or []
                denominators = (_baseline_by_world(base, target.metric, members) if paired
                                else [_baseline_mean(base, target.metric)] * len(members))
                lacking = [r.world for r, d in zip(members, denominators, strict=True) if d is None or d <= 0]
                if lacking:
                    why = (f"no positive value of baseline recipe {baseline!r} on worlds {lacking}" if paired
                           else f"no positive seed mean of baseline recipe {baseline!r}")
                    rows.append({**row, "verdict": "not measured", "why": why})
                    continue
                values = [None if v is None else v / d for v, d in zip(values, denominators, strict=True)]
                row["values"] = values
            missing = [r.seed for r, v in zip(members, values, strict=True) if v is None]
            if missing:
                rows.append({**row, "verdict": "not measured", "why": f"seeds {missing} do not record it"})
                continue
            mean, ci = t_interval(values)
            worst = (min if target.op == ">=" else max)(range(len(values)), key=values.__getitem__)
            verdict = "met" if all(target.meets(v) for v in values) else "not met"
            why = "" if len(values) >= MIN_SEEDS else f"fewer than {MIN_SEEDS} seeds"
            rows.append({**row, "mean": mean, "ci95": ci, "worst_seed": members[worst].seed, "worst": values[worst],
                         "verdict": verdict, "why": why})
        out.append({"recipe": recipe, "seeds": [r.seed for r in members],
                    "heldout_seeds": [r.seed for r in members if r.heldout], "targets": rows})
    return out


def _baseline_mean(members: list[Run], metric: str) -> float | None:
    values = [METRICS[metric](r.report) for r in members]
    return None if not values or None in values else statistics.fmean(values)


def _baseline_by_world(base: list[Run], metric: str, members: list[Run]) -> list[float | None]:
    """The baseline's value of ``metric`` on each member's world, the mean of its seeds there (None where it did
    not run there or does not record the metric)."""
    by_world: dict[int, list[Run]] = {}
    for run in base:
        by_world.setdefault(run.world, []).append(run)
    return [_baseline_mean(by_world.get(r.world, []), metric) for r in members]


def markdown(card: list[dict]) -> str:
    """The scorecard as one markdown table (a row per recipe and target)."""
    lines = ["| recipe (seeds) | target | metric | mean ± 95% CI (t, n-1 df) | worst seed | threshold | verdict |",
             "|---|---|---|---|---|---|---|"]
    for recipe in card:
        label = f"{recipe['recipe']} ({', '.join(map(str, recipe['seeds']))})"
        for row in recipe["targets"]:
            per = "same world" if row.get("paired") else "mean"
            metric = row["metric"] + (f" / {row['relative_to']} {per}" if row["relative_to"] else "")
            ci = "" if row["ci95"] is None else f" ± {row['ci95']:.3f}"
            worst = "—" if row["worst_seed"] is None else f"{em.fmt(row['worst'])} (seed {row['worst_seed']})"
            verdict = row["verdict"] + (f" ({row['why']})" if row["why"] else "")
            lines.append(f"| {label} | {row['target']} | {metric} | {em.fmt(row['mean'])}{ci} | {worst} | "
                         f"{row['op']} {row['threshold']:g} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.evaluation.scorecard",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="train.evaluation.evaluate --json reports, one per recipe and seed")
    parser.add_argument("--targets", default=str(DEFAULT_TARGETS), help="the targets table (YAML)")
    parser.add_argument("--runs", default=None, help="the runs manifest (results/runs.json) for recipe and seed")
    parser.add_argument("--baseline", default=None, help="recipe the relative targets divide by (default: the "
                                                         "table's)")
    parser.add_argument("--paired", action="store_true",
                        help="relative targets divide by the baseline on the same world instead of its seed mean")
    parser.add_argument("--exclude-heldout", action="store_true",
                        help="leave out runs on held-out world seeds (while choosing a recipe)")
    parser.add_argument("--json", default=None, help="also write the scorecard here")
    args = parser.parse_args(argv)
    try:
        targets = load_targets(args.targets)
        manifest = json.loads(Path(args.runs).read_text()) if args.runs else None
        runs = read_runs(args.reports, manifest)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.exclude_heldout:
        runs = [r for r in runs if not r.heldout]
    card = score(runs, targets, args.baseline, args.paired)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"targets": [asdict(t) for t in targets.targets], "recipes": card},
                                              indent=2))
    print(markdown(card), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

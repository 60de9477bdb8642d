"""Evaluate a knowledge update: ``python -m pure_reasoner.train.update_eval --before DIR --after DIR [--json OUT]``.

Both exports answer the same questions (``train.world_update.update_splits`` of the update in ``--after``, or
``--update DIR``: its ``world.json`` + ``update.json``), scored as ``train.evaluation`` scores a split: the choice
with the highest log-likelihood, knowledge on. The report compares the two:
    new:       held-out new people's facts (one- and two-hop); ``vs_pretrained`` = their chance-adjusted accuracy
               after the update over the model's before it on the base world's held-out facts (``closed_book``,
               ``closed_book_two_hop``): new facts learned as well as pretraining facts gives 1.
    changed:   the changed facts: ``acc`` picks the new value, ``memorised`` the old one (it is among the choices).
    retained:  the base world's closed-book facts (people with a changed fact left out): ``relative`` = adjusted
               accuracy after / before; ``kept`` = share of the questions answered right before that still are.
    reading:   open book, two-hop open book and counterfactual: the accuracy change and whether the accuracy after
               lies in the 95% Wilson interval of the accuracy before (``within_ci``).
    targets:   new ``vs_pretrained`` >= 0.9, ``retained.relative`` >= 0.9, reading ``within_ci`` on every split.
    stored:    with ``--bits-people N``: the bits about the new people each export holds (``knowledge_bits`` over
               the update's new people as a world, N of them scored), knowledge on and off, the bits gained, and
               the parameter elements that differ between the exports. An update that trains only the knowledge
               experts (``--trainable experts``) stores what it gains in those elements alone: a storage
               measurement of the experts (docs/science.md, Capacity).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pure_reasoner.train.evaluation import scores as em
from pure_reasoner.train.world_update import (
    CHANGED_SPLIT,
    NEW_SPLITS,
    READING_SPLITS,
    RETAINED_SPLITS,
    WorldUpdate,
    load_update,
    update_splits,
)

TARGET_NEW_RATIO = 0.9  # new facts recalled at >= 0.9x the accuracy of pretraining facts
TARGET_RETAINED = 0.9  # old facts: >= 90% of the adjusted accuracy before the update
# The pretraining split each new split is measured against.
PRETRAINED_FOR = dict(zip(NEW_SPLITS, RETAINED_SPLITS, strict=True))


def split_scores(examples: Sequence[dict], predictions: Sequence[str]) -> dict:
    """Accuracy of ``predictions`` (chosen answer strings) on ``examples``: n, chance, acc, acc_adjusted, the 95%
    Wilson interval, and ``memorised`` (share choosing the example's ``memorised`` value; None when it has none)."""
    if len(examples) != len(predictions) or not examples:
        raise ValueError(f"need one prediction per example and at least one, got {len(predictions)} for "
                         f"{len(examples)}")
    correct = [p == ex["answer"] for p, ex in zip(predictions, examples, strict=True)]
    chance = em.chance_level([len(ex["choices"]) for ex in examples])
    acc = em.accuracy(correct)
    memorised = None
    if all(ex.get("memorised") for ex in examples):
        memorised = em.accuracy([p == ex["memorised"] for p, ex in zip(predictions, examples, strict=True)])
    return {"n": len(examples), "chance": chance, "acc": acc, "acc_adjusted": em.chance_adjusted(acc, chance),
            "acc_interval": list(em.wilson_interval(sum(correct), len(correct))), "memorised": memorised}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None  # no knowledge before: no ratio


def compare(examples: dict[str, list[dict]], before: dict[str, list[str]], after: dict[str, list[str]]) -> dict:
    """The update report (module docstring) from the two models' chosen answers per split."""
    splits = {s: {"before": split_scores(exs, before[s]), "after": split_scores(exs, after[s])}
              for s, exs in examples.items()}
    report = {"splits": splits, "new": {}, "retained": {}, "reading": {}}
    for split, pretrained in PRETRAINED_FOR.items():
        if split in splits and pretrained in splits:
            after_adj = splits[split]["after"]["acc_adjusted"]
            base_adj = splits[pretrained]["before"]["acc_adjusted"]
            report["new"][split] = {"acc_adjusted": after_adj, "pretrained_acc_adjusted": base_adj,
                                    "vs_pretrained": _ratio(after_adj, base_adj)}
    if CHANGED_SPLIT in splits:
        report["changed"] = {w: {"acc": splits[CHANGED_SPLIT][w]["acc"],
                                 "memorised": splits[CHANGED_SPLIT][w]["memorised"]} for w in ("before", "after")}
    for split in RETAINED_SPLITS:
        if split in splits:
            exs, b, a = examples[split], before[split], after[split]
            known = [i for i, ex in enumerate(exs) if b[i] == ex["answer"]]
            report["retained"][split] = {
                "relative": _ratio(splits[split]["after"]["acc_adjusted"], splits[split]["before"]["acc_adjusted"]),
                "kept": sum(a[i] == exs[i]["answer"] for i in known) / len(known) if known else None,
                "known_before": len(known)}
    for split in READING_SPLITS:
        if split in splits:
            lo, hi = splits[split]["before"]["acc_interval"]
            acc = splits[split]["after"]["acc"]
            report["reading"][split] = {"delta": acc - splits[split]["before"]["acc"], "within_ci": lo <= acc <= hi}
    report["targets"] = _targets(report)
    return report


def _targets(report: dict) -> dict:
    """Each target: met (bool) or None when nothing measures it."""
    new = [v["vs_pretrained"] for v in report["new"].values()]
    retained = [v["relative"] for v in report["retained"].values()]
    reading = [v["within_ci"] for v in report["reading"].values()]
    return {f"new_vs_pretrained>={TARGET_NEW_RATIO}": all(r is not None and r >= TARGET_NEW_RATIO for r in new)
            if new else None,
            f"retained>={TARGET_RETAINED}": all(r is not None and r >= TARGET_RETAINED for r in retained)
            if retained else None,
            "reading_within_ci": all(reading) if reading else None}


def choices_made(directory: str | Path, examples: dict[str, list[dict]], batch_size: int = 16,
                 device: str = "cpu") -> dict[str, list[str]]:
    """The export's chosen answer per example (``train.evaluation.evaluate.evaluate_split``, knowledge on),
    split -> answers."""
    from pure_reasoner.train.evaluation.evaluate import evaluate_split, load

    model, codec = load(directory, device)
    return {s: evaluate_split(model, codec, exs, "base", batch_size=batch_size, generate=False).predictions
            for s, exs in examples.items()}


def evaluate_update(before: str | Path, after: str | Path, update: WorldUpdate | None = None, *,
                    max_examples: int | None = None, batch_size: int = 16, device: str = "cpu") -> dict:
    """Score both exports on the update's questions (``update``: default the one ``after`` was trained on)."""
    update = update or load_update(after)
    examples = {s: exs[:max_examples] for s, exs in update_splits(update).items()}
    report = compare(examples, choices_made(before, examples, batch_size, device),
                     choices_made(after, examples, batch_size, device))
    return {"before": str(before), "after": str(after), "update": dataclasses.asdict(update.cfg), **report}


def changed_elements(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> number of elements that differ between two models of one architecture (names whose
    elements all agree left out). Raises ValueError when the parameter names or shapes differ."""
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    if a.keys() != b.keys() or any(a[n].shape != b[n].shape for n in a):
        raise ValueError("the two exports are not one architecture: their parameter names or shapes differ")
    counts = {n: int((a[n] != b[n]).sum()) for n in a}
    return {n: c for n, c in counts.items() if c}


def stored_bits(before: str | Path, after: str | Path, update: WorldUpdate, people: int, *,
                batch_size: int = 16, device: str = "cpu") -> dict:
    """The ``stored`` section of the report (module docstring): ``knowledge_bits`` of both exports over the
    update's new people (``people`` of them scored), knowledge on and off; ``gained`` = after - before of
    ``bits`` and ``fano_bits``; ``changed_elements`` and the gains per changed element."""
    from pure_reasoner.train.evaluation.evaluate import knowledge_bits, load

    world = update.new_world
    if world is None:
        raise ValueError("--bits-people needs an update with new people; this one has none")
    models = {"before": load(before, device), "after": load(after, device)}
    out: dict = {"people": len(world.people)}
    for ablation in ("base", "knowledge_off"):
        for when, (model, codec) in models.items():
            bits = knowledge_bits(model, codec, world, people, batch_size, ablation)
            out.setdefault(ablation, {})[when] = {k: bits[k] for k in ("bits", "fano_bits", "max_bits",
                                                                       "people_scored", "per_attribute")}
        both = out[ablation]
        both["gained"] = {k: both["after"][k] - both["before"][k] for k in ("bits", "fano_bits")}
    changed = changed_elements(models["before"][0], models["after"][0])
    elements = sum(changed.values())
    out |= {"changed_elements": elements, "changed_parameters": sorted(changed),
            "knowledge_expert_params": sum(p.numel() for layer in models["after"][0].moe_layers()
                                           for p in layer.experts.parameters()),
            "bits_per_changed_element": em.per_parameter(out["base"]["gained"]["bits"], elements),
            "fano_bits_per_changed_element": em.per_parameter(out["base"]["gained"]["fano_bits"], elements)}
    return out


def _cell(r: dict) -> str:
    return f"{r['acc']:.2f} [{r['acc_interval'][0]:.2f}, {r['acc_interval'][1]:.2f}]"


def render(report: dict) -> str:
    """A short text table of the report."""
    lines = [f"{'split':<22}{'n':>5}{'before':>20}{'after':>20}"]
    for split, r in report["splits"].items():
        lines.append(f"{split:<22}{r['before']['n']:>5}{_cell(r['before']):>20}{_cell(r['after']):>20}")
    for split, r in report["new"].items():
        ratio = "n/a" if r["vs_pretrained"] is None else f"{r['vs_pretrained']:.2f}"
        lines.append(f"new facts ({split}): adjusted {r['acc_adjusted']:+.2f} vs pretraining "
                     f"{r['pretrained_acc_adjusted']:+.2f}: ratio {ratio} (target >= {TARGET_NEW_RATIO})")
    if "changed" in report:
        c = report["changed"]
        lines.append(f"changed facts: new value {c['before']['acc']:.2f} -> {c['after']['acc']:.2f}, old value "
                     f"{c['before']['memorised']:.2f} -> {c['after']['memorised']:.2f}")
    for split, r in report["retained"].items():
        rel = "n/a" if r["relative"] is None else f"{r['relative']:.2f}"
        kept = "n/a" if r["kept"] is None else f"{r['kept']:.2f}"
        lines.append(f"retained ({split}): adjusted accuracy x{rel}, kept {kept} of {r['known_before']} known "
                     f"(target >= {TARGET_RETAINED})")
    for split, r in report["reading"].items():
        lines.append(f"reading ({split}): {r['delta']:+.2f}, {'within' if r['within_ci'] else 'OUTSIDE'} the "
                     "95% interval before")
    lines.append("targets: " + ", ".join(f"{k} {v}" for k, v in report["targets"].items()))
    if "stored" in report:
        st, per = report["stored"], report["stored"]["bits_per_changed_element"]
        lines.append(f"stored about {st['people']} new people: {st['base']['gained']['bits']:+.0f} bits "
                     f"({st['base']['gained']['fano_bits']:+.0f} Fano), knowledge off "
                     f"{st['knowledge_off']['gained']['bits']:+.0f}; {st['changed_elements']} elements changed: "
                     + ("n/a" if per is None else f"{per:.3f} bits per changed element"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.update_eval",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the export before the update")
    parser.add_argument("--after", required=True, help="the export after the update")
    parser.add_argument("--update", default=None, help="a directory with world.json + update.json (default: --after)")
    parser.add_argument("--max-examples", type=int, default=None, help="per split (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bits-people", type=int, default=0,
                        help="also measure the bits stored about the new people, scoring this many (0: off)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.bits_people < 0:
        parser.error(f"--bits-people must be >= 0, got {args.bits_people}")
    for name in ("max_examples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    try:
        update = load_update(args.update or args.after)
        report = evaluate_update(args.before, args.after, update, max_examples=args.max_examples,
                                 batch_size=args.batch_size, device=args.device)
        if args.bits_people:
            report["stored"] = stored_bits(args.before, args.after, update, args.bits_people,
                                           batch_size=args.batch_size, device=args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The table a training run on the built-in knowledge world ends with: closed- and open-book accuracy with the
knowledge experts on and off, on a few hundred of the world's questions, so that the first run shows
what the architecture is for. ``python -m pure_reasoner.train.evaluation`` gives the full report (every split,
ablation, faithfulness, knowledge bits, routing).
"""

from __future__ import annotations

from pathlib import Path

from pure_reasoner.train.evaluation.evaluate import evaluate, load
from pure_reasoner.train.world.generator import build_world, load_world_config

SPLITS = {"closed_book": "closed book (recall)", "open_book": "open book (read)"}


def first_look(export_dir: Path, max_examples: int) -> dict | None:
    """``train.evaluation.evaluate.evaluate``'s report for the exported model on the closed- and open-book splits
    (at most ``max_examples`` questions each; knowledge on, and off when the model has MoE layers). None when the export
    carries no ``world.json`` (the run's data was not the built-in world)."""
    world_path = Path(export_dir) / "world.json"
    if not world_path.is_file():
        return None
    model, codec = load(export_dir)
    world = build_world(load_world_config(world_path))
    ablations = ("base", "knowledge_off") if model.moe_layers() else ("base",)
    return evaluate(model, codec, world, tuple(SPLITS), ablations, max_examples=max_examples, generate=(),
                    bits_people=0)


def render(report: dict) -> str:
    """The report as a short text table: accuracy (chance-adjusted, 95% interval) per split and ablation."""
    columns = {"base": "knowledge on", "knowledge_off": "knowledge off"}
    shown = [a for a in columns if a in next(iter(report["splits"].values()))]
    lines = [f"{'':<22}{'n':>5}" + "".join(f"{columns[a]:>30}" for a in shown)]
    for split, label in SPLITS.items():
        by_ablation = report["splits"][split]
        cells = []
        for a in shown:
            r = by_ablation[a]
            lo, hi = r["acc_interval"]
            cells.append(f"{r['acc']:.2f} [{lo:.2f}, {hi:.2f}] ({r['acc_adjusted']:+.2f})")
        lines.append(f"{label:<22}{by_ablation['base']['n']:>5}" + "".join(f"{c:>30}" for c in cells))
    chance = report["splits"]["closed_book"]["base"]["chance"]
    lines.append(f"accuracy [95% interval] (chance-adjusted); chance {chance:.2f}. "
                 "Full report: python -m pure_reasoner.train.evaluation")
    return "\n".join(lines)

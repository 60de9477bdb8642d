"""Does what survives the mean ablation depend on which mean? Closed book under ``knowledge_mean`` with the
constant recorded over different sets of text of the model's own world.

    python scripts/mean_constants.py runs/<run>/export [runs/<run>/export ...] [--json OUT]

Sets (each its own constant per MoE layer, ``train.evaluation.mean_reference.reference_means``):
- ``eval``: the eval's reference set (closed-book questions about the QA people, half; fresh reading drills, half);
- ``closed_only``: its closed-book half alone;
- ``corpus``: the first 128 non-drill rows of the training corpus (biographies, QA lists, comparisons), as trained;
- ``corpus_drills``: 64 of those plus 64 of the corpus's reading drills.
A model whose experts add nothing person-specific beyond their mean loses the same whatever the set; a model that
keeps facts behind some average expert output (a "key") recalls more under the constant closest to it.
Prints, per model and set, the constant's norm per layer, its distance from the eval's, and closed book (chance
adjusted) under it; with ``--json``, writes the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pure_reasoner.train.evaluation.evaluate import evaluate_split, load
from pure_reasoner.train.evaluation.mean_reference import reference_means
from pure_reasoner.train.world.generator import build_world, load_world_config, pretraining_rows
from pure_reasoner.train.world.splits import reference_closed_count, reference_pairs, split_examples


def _row_text(row: dict) -> str:
    return f"{row['context']}\n{row['text']}" if row.get("context") else row["text"]


def constant_sets(world) -> dict[str, list[tuple[str, str]]]:
    """The (prompt, continuation) pairs of each set (continuation " x": the prompt's tokens are what counts)."""
    rows = pretraining_rows(world)
    written = [(_row_text(r), " x") for r in rows if r["kind"] != "drill"][:128]
    drills = [(_row_text(r), " x") for r in rows if r["kind"] == "drill"][:64]
    reference = reference_pairs(world)
    return {"eval": reference, "closed_only": reference[:reference_closed_count(world)], "corpus": written,
            "corpus_drills": written[:64] + drills}


def measure(export: Path) -> dict:
    model, codec = load(export)
    world = build_world(load_world_config(export / "world.json"))
    examples = split_examples(world, "closed_book")
    out, means = {}, {}
    for name, pairs in constant_sets(world).items():
        ref = reference_means(model, codec, pairs)
        means[name] = ref.knowledge_LD
        result = evaluate_split(model, codec, examples, "knowledge_mean", generate=False, reference=ref)
        out[name] = {"sequences": len(pairs), "norm": ref.knowledge_LD.norm(dim=1).tolist(),
                     "closed_book_adjusted": result.acc_adjusted}
    for name, entry in out.items():
        entry["distance_from_eval"] = (means[name] - means["eval"]).norm(dim=1).tolist()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {}
    for export in args.exports:
        report[str(export)] = measure(export)
        for name, entry in report[str(export)].items():
            norms = " ".join(f"{x:.2f}" for x in entry["norm"])
            dist = " ".join(f"{x:.2f}" for x in entry["distance_from_eval"])
            print(f"{export}  {name:13s} n={entry['sequences']:3d}  norm [{norms}]  from eval [{dist}]  "
                  f"closed book {entry['closed_book_adjusted']:+.3f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

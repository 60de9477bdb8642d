"""Does a closed-book answer position consult as often bare as after a long packed prefix?

    python scripts/consult_shift.py runs/<name>/export [--questions 64] [--prefix-bios 0 1 4]

For each count of prefix biographies (of other known people, joined by newlines, as rows are packed in training
without a document mask), the share of the world's closed-book questions whose answer-predicting position (the
prompt's last token) consults knowledge, per MoE layer. A router whose cut was set on training windows of
``data.seq_len`` tokens can consult very differently on a short eval prompt; ``data.doc_mask`` trains every row
from its own start instead.
"""

from __future__ import annotations

import argparse
import random

import torch

from pure_reasoner.train.evaluation.evaluate import consult_map, load
from pure_reasoner.train.world.generator import build_world, load_world_config
from pure_reasoner.train.world.splits import split_examples
from pure_reasoner.train.world.text import biography


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--prefix-bios", type=int, nargs="+", default=[0, 1, 4])
    args = parser.parse_args()
    model, codec = load(args.export)
    world = build_world(load_world_config(f"{args.export}/world.json"))
    questions = split_examples(world, "closed_book")[: args.questions]
    rng = random.Random(0)
    for count in args.prefix_bios:
        hits_L, lengths = torch.zeros(len(model.moe_layers())), []
        for ex in questions:
            prefix = "\n".join(biography(p.name, world.values(p), rng).text for p in rng.sample(world.people, count))
            ids = (codec.encode(prefix + "\n") if count else []) + codec.encode(ex["prompt"])
            ids = ids[-model.cfg.max_seq_len :]
            with torch.no_grad():
                hits_L += consult_map(model, torch.tensor([ids]))[:, 0, -1].float()
            lengths.append(len(ids))
        rates = ", ".join(f"{float(h) / len(questions):.2f}" for h in hits_L)
        print(f"{count} prefix biographies (~{sum(lengths) // len(lengths)} tokens): answer position consults "
              f"in layers [{rates}]")


if __name__ == "__main__":
    main()

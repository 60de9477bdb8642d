"""How well a model reads a birth date from its context: the mean log-probability of the stated date's tokens,
by part (month name, day digits, the two year digits after " 19"), given the prompt, over the first 40
birth-date questions of the counterfactual and open-book splits (knowledge on).

    python scripts/date_token_logprob.py [--subject-only] runs/<run> [runs/<run> ...]

``--subject-only`` keeps only the asked person's biography in the context (no second date to confuse a copy).
Uniform over ten digits is -2.3 (ln 10); over 12 months' first tokens about -2.5.
The diagnostic behind results/protocol.md's "Where faithfulness fails" and "No copy of the year" sections.
"""

import collections
import sys

import torch
import torch.nn.functional as F

from pure_reasoner.train.evaluation.evaluate import ablated_forward, load
from pure_reasoner.train.world.generator import build_world, load_world_config
from pure_reasoner.train.world.splits import split_examples
from pure_reasoner.train.world.text import continuation


def part_of(pieces: list[str], k: int) -> str | None:
    """Which part of a tokenized date ``pieces`` token ``k`` is: month, day, year1, year2 or None."""
    comma, century = pieces.index(","), pieces.index(" 19")
    if k < comma:
        return "day" if any(ch.isdigit() for ch in pieces[k]) else "month"
    return {century + 1: "year1", century + 2: "year2"}.get(k)


def subject_only(example: dict) -> str:
    """The prompt with only the asked person's biography as context (biographies are one line each)."""
    line = next(b for b in example["context"].split("\n") if b.count(example["person"]) >= 2)
    return line + "\n" + example["prompt"][len(example["context"]):]


args = sys.argv[1:]
only = "--subject-only" in args
for run in [a for a in args if a != "--subject-only"]:
    model, codec = load(f"{run}/export")
    world = build_world(load_world_config(f"{run}/export/world.json"))
    for split in ("counterfactual", "open_book"):
        examples = [e for e in split_examples(world, split)[:400] if e["attribute"] == "birth_date"][:40]
        logprobs = collections.defaultdict(list)
        for e in examples:
            prompt = codec.encode(subject_only(e) if only else e["prompt"])
            answer = codec.encode(continuation(e["answer"]))
            with torch.no_grad():
                logits_1SV = ablated_forward(model, torch.tensor([(prompt + answer)[:-1]]), "base").logits_BSV
            logp_NV = F.log_softmax(logits_1SV.float(), -1)[0, len(prompt) - 1:]
            pieces = [codec.decode([i]) for i in answer]
            for k, i in enumerate(answer):
                if (part := part_of(pieces, k)) is not None:
                    logprobs[part].append(float(logp_NV[k, i]))
        parts = ", ".join(f"{p} {sum(v) / len(v):.2f}" for p, v in logprobs.items())
        print(f"{run} {split}{' (subject only)' if only else ''}: mean log-prob {parts} "
              f"({len(examples)} questions)", flush=True)

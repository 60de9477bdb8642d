"""How well a model reads a birth date from its context: the mean log-probability of the stated date's number
tokens (every token with a digit except " 19"), given the prompt, over the first 25 birth-date questions of the
counterfactual and open-book splits (knowledge on).

    python scripts/date_token_logprob.py runs/<run> [runs/<run> ...]

Uniform over ten digits is -2.3 (ln 10); over 31 days or 100 years (whole-number tokens) -3.4 and -4.6.
The diagnostic behind results/protocol.md's "Where faithfulness fails" section.
"""

import sys

import torch
import torch.nn.functional as F

from pure_reasoner.train.evaluation.evaluate import ablated_forward, load
from pure_reasoner.train.world.generator import build_world, load_world_config
from pure_reasoner.train.world.splits import split_examples
from pure_reasoner.train.world.text import continuation

for run in sys.argv[1:]:
    model, codec = load(f"{run}/export")
    world = build_world(load_world_config(f"{run}/export/world.json"))
    for split in ("counterfactual", "open_book"):
        examples = [e for e in split_examples(world, split)[:240] if e["attribute"] == "birth_date"][:25]
        logprobs = []
        for e in examples:
            prompt, answer = codec.encode(e["prompt"]), codec.encode(continuation(e["answer"]))
            with torch.no_grad():
                logits_1SV = ablated_forward(model, torch.tensor([(prompt + answer)[:-1]]), "base").logits_BSV
            logp_NV = F.log_softmax(logits_1SV.float(), -1)[0, len(prompt) - 1:]
            for k, i in enumerate(answer):
                piece = codec.decode([i])
                if any(ch.isdigit() for ch in piece) and piece.strip() != "19":
                    logprobs.append(float(logp_NV[k, i]))
        print(f"{run} {split}: number-token mean log-prob {sum(logprobs) / len(logprobs):.3f} "
              f"over {len(logprobs)} tokens", flush=True)

"""Where the model looks when it should copy: per layer, the largest (over heads) mean attention weight that a
query token puts on the context token that follows an earlier copy of itself (what an induction head does),
for two queries of fresh birth-date reading drills (people never trained on, one question each):

- ``name``: the question's first name token ("Q: When was Zudro ..."), whose next token the context's biography
  has right after the same token;
- ``year``: the answer's " 19", whose next token (the decade digit) follows " 19" in the context's date of the
  asked person.

    python scripts/date_copy_attention.py runs/<run> [runs/<run> ...]

Attention weights are recomputed from each block's inputs (a forward hook on ``Attention.queries_keys``, the
queries and keys the model scores; causal, one drill per forward). Uniform attention over a 200-token context is 0.005.
The diagnostic behind results/protocol.md's "No copy of the year" section.
"""

import math
import sys

import torch

from pure_reasoner.train.evaluation.evaluate import ablated_forward, load
from pure_reasoner.train.world.generator import build_world, load_world_config
from pure_reasoner.train.world.splits import reading_drills
from pure_reasoner.train.world.text import continuation


def attention_hook(store: dict, layer: int):
    """A forward hook that stores the layer's attention probabilities [H, S, S] of batch row 0."""
    def hook(attn, args, _kwargs, _out):
        q_BHSQ, k_BGSQ = attn.queries_keys(*args[:3])
        seq = q_BHSQ.shape[2]
        k_BHSQ = k_BGSQ.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        scores_HSS = (q_BHSQ @ k_BHSQ.transpose(-1, -2))[0] / math.sqrt(attn.head_dim)
        future_SS = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        store[layer] = scores_HSS.masked_fill(future_SS, float("-inf")).softmax(-1)
    return hook


for run in sys.argv[1:]:
    model, codec = load(f"{run}/export")
    world = build_world(load_world_config(f"{run}/export/world.json"))
    store: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(attention_hook(store, i), with_kwargs=True)
    drills = [d for d in reading_drills(world, "attention", 120, "attention") if d["attribute"] == "birth_date"]
    weights: dict[str, list[list[float]]] = {"name": [], "year": []}
    for d in drills:
        context = codec.encode(d["context"])
        ids = codec.encode(d["prompt"]) + codec.encode(continuation(d["answer"]))
        pieces = [codec.decode([i]) for i in ids]
        asked = len(codec.encode(d["prompt"].split(" born?")[0].rsplit(" " + d["person"], 1)[0]))  # first name token
        century = len(context) + pieces[len(context):].index(" 19")  # the answer's " 19"
        with torch.no_grad():
            ablated_forward(model, torch.tensor([ids]), "base")
        for kind, q in (("name", asked), ("year", century)):
            # induction targets: context positions right after an earlier copy of the query's token
            targets = [p + 1 for p in range(len(context) - 1) if ids[p] == ids[q] and ids[p + 1] == ids[q + 1]]
            if targets:
                weights[kind].append([float(store[layer][:, q, targets].sum(-1).max())
                                      for layer in range(len(model.blocks))])
    for kind, rows in weights.items():
        per_layer = [sum(r[layer] for r in rows) / len(rows) for layer in range(len(model.blocks))]
        print(f"{run} {kind} ({len(rows)} drills): best head's mean attention on the copy's next token per layer "
              + " ".join(f"{w:.3f}" for w in per_layer), flush=True)

"""Trace documents through a model, summarise which experts facts trigger, and write the raw JSON.

Shape legend: L MoE layers, S tokens of one document, K top-k slots.

The per-expert summary answers two questions over a set of annotated documents (see
``moe.trace_text`` for the format): which entities and fact types most often reach each knowledge
expert, and how much more often fact-bearing tokens consult knowledge than the rest.
"""

from __future__ import annotations

import colorsys
from collections import Counter, defaultdict
from typing import NamedTuple

import torch

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.moe.model import PureReasonerLM
from pure_reasoner.moe.trace import KnowledgeTrace, record_knowledge_trace
from pure_reasoner.moe.trace_text import Fact, TextCodec, Token

FORMAT, VERSION = "pure-reasoner.knowledge-trace", 1


class TracedDoc(NamedTuple):
    """One document and its routing: expert_ids_LSK (-1 = idle slot) and gates_LSK, on the CPU."""

    text: str
    tokens: list[Token]
    facts: list[Fact]
    expert_ids_LSK: torch.Tensor
    gates_LSK: torch.Tensor

    def token_facts(self) -> list[list[Fact]]:
        """For each token, the facts whose character span overlaps the token's."""
        return [[f for f in self.facts if t.start < f.end and f.start < t.end] for t in self.tokens]

    def layers_consulted(self) -> list[int]:
        """For each token, in how many of the L layers it consulted knowledge."""
        return (self.expert_ids_LSK != NOT_CONSULTED).any(-1).sum(0).tolist()


def encode_all(codec: TextCodec, docs: list[tuple[str, list[Fact]]], max_len: int, truncate: bool) -> list[list[Token]]:
    """Tokenize every document before anything runs, so bad input fails before any work."""
    encoded = []
    for i, (text, _) in enumerate(docs):
        tokens = codec.encode(text)
        if len(tokens) > max_len and not truncate:
            raise ValueError(f"document {i} is {len(tokens)} tokens, over model.max_seq_len={max_len} (use --truncate)")
        encoded.append(tokens[:max_len])
    return encoded


@torch.no_grad()
def trace_documents(
    model: PureReasonerLM, docs: list[tuple[str, list[Fact]]], encoded: list[list[Token]]
) -> tuple[list[TracedDoc], KnowledgeTrace]:
    """Run each document through ``model`` alone (batch 1) while recording its routing."""
    device = next(model.parameters()).device
    with record_knowledge_trace(model) as trace:
        for tokens in encoded:
            model(torch.tensor([[t.id for t in tokens]], device=device))
    traced = [
        TracedDoc(text, tokens, facts, p.expert_ids_LBSK[:, 0].cpu(), p.gates_LBSK[:, 0].cpu())
        for (text, facts), tokens, p in zip(docs, encoded, trace.passes, strict=True)
    ]
    return traced, trace


def shade(count: int, num_layers: int) -> tuple[str, str] | None:
    """(background, ink) hex colours for a token that consulted knowledge in ``count`` of the
    ``num_layers`` MoE layers: none for 0, then an orange that darkens with the count. Every view
    uses this one scale."""
    if count == 0:
        return None
    lightness = 0.86 - 0.40 * count / num_layers
    r, g, b = (round(255 * c) for c in colorsys.hls_to_rgb(28 / 360, lightness, 0.88))
    return f"#{r:02x}{g:02x}{b:02x}", "#ffffff" if lightness < 0.6 else "#1d1d1f"


def pct(value: float | None) -> str:
    """A rate for display: ``12.5%``, or ``–`` when undefined."""
    return "–" if value is None else f"{100 * value:.1f}%"


def times(value: float | None) -> str:
    """A ratio for display: ``3.10×``, or ``–`` when undefined."""
    return "–" if value is None else f"{value:.2f}×"


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _rates(consulted_S: torch.Tensor, fact_S: torch.Tensor) -> dict:
    """Consult rate overall, on fact-bearing tokens and on the rest (None where there are none)."""
    fact = _rate(int(consulted_S[fact_S].sum()), int(fact_S.sum()))
    other = _rate(int(consulted_S[~fact_S].sum()), int((~fact_S).sum()))
    return {
        "consult_rate": _rate(int(consulted_S.sum()), consulted_S.numel()),
        "consult_rate_fact": fact,
        "consult_rate_other": other,
        "fact_vs_other": fact / other if fact is not None and other else None,
    }


def summarize(docs: list[TracedDoc], trace: KnowledgeTrace, top: int = 5) -> dict:
    """Per-layer consult rates (fact-bearing vs other tokens) and, per knowledge expert, its load
    and the fact types (with lift over the layer's routed slots) and entities that reach it most."""
    num_layers, num_experts = trace.num_layers, trace.num_experts
    ids_LN = torch.cat([d.expert_ids_LSK.flatten(1) for d in docs], 1)  # N = all tokens x K slots
    gates_LN = torch.cat([d.gates_LSK.flatten(1) for d in docs], 1)
    token_facts = [facts for d in docs for facts in d.token_facts()]
    fact_T = torch.tensor([bool(f) for f in token_facts], dtype=torch.bool)
    consulted_LT = torch.cat([(d.expert_ids_LSK != NOT_CONSULTED).any(-1) for d in docs], 1)
    # Fact types and entities per (layer, expert), and per layer for the lift's base rate.
    types, entities = defaultdict(Counter), defaultdict(Counter)
    layer_types = Counter()
    top_k = docs[0].expert_ids_LSK.shape[-1]
    ids_LTK = ids_LN.view(num_layers, -1, top_k).tolist()  # plain lists: this loop is per token
    for t in fact_T.nonzero()[:, 0].tolist():
        kinds = {f.type for f in token_facts[t]}
        whos = {f.entity for f in token_facts[t]}
        for layer in range(num_layers):
            for e in ids_LTK[layer][t]:
                if e != NOT_CONSULTED:
                    types[layer, e].update(kinds)
                    entities[layer, e].update(whos)
                    layer_types.update((layer, k) for k in kinds)
    fact_N = fact_T.repeat_interleave(top_k)
    experts = []
    for layer in range(num_layers):
        routed_N = ids_LN[layer] != NOT_CONSULTED
        load_E = torch.bincount(ids_LN[layer][routed_N], minlength=num_experts)
        gate_E = torch.zeros(num_experts).index_add_(0, ids_LN[layer][routed_N], gates_LN[layer][routed_N])
        fact_load_E = torch.bincount(ids_LN[layer][routed_N & fact_N], minlength=num_experts)
        layer_slots = int(routed_N.sum())
        for e in range(num_experts):
            slots = int(load_E[e])
            experts.append({
                "layer": layer,
                "block": trace.moe_blocks[layer],
                "expert": e,
                "slots": slots,
                "mean_gate": float(gate_E[e]) / slots if slots else None,
                "fact_share": _rate(int(fact_load_E[e]), slots),
                "types": [
                    {"type": k, "slots": c, "lift": (c / slots) / (layer_types[layer, k] / layer_slots)}
                    for k, c in types[layer, e].most_common(top)
                ],
                "entities": [{"entity": w, "slots": c} for w, c in entities[layer, e].most_common(top)],
            })
    return {
        "num_documents": len(docs),
        "num_tokens": int(fact_T.numel()),
        "num_fact_tokens": int(fact_T.sum()),
        "layers": [{"block": b, **_rates(consulted_LT[i], fact_T)} for i, b in enumerate(trace.moe_blocks)],
        "any_layer": _rates(consulted_LT.any(0), fact_T),
        "experts": experts,
    }


def rate_table(summary: dict) -> tuple[str, list[str], list[list[str]]]:
    """Title, header and rows of the consult-rate table (every view shows this one)."""
    title = (f"Consult rate over {summary['num_documents']} document(s), {summary['num_tokens']} tokens "
             f"({summary['num_fact_tokens']} fact-bearing)")
    named = [*((f"block {r['block']}", r) for r in summary["layers"]), ("any layer", summary["any_layer"])]
    rates = ("consult_rate", "consult_rate_fact", "consult_rate_other")
    rows = [[name, *(pct(r[k]) for k in rates), times(r["fact_vs_other"])] for name, r in named]
    return title, ["layer", "all tokens", "fact tokens", "other tokens", "fact / other"], rows


def expert_table(summary: dict, limit: int) -> tuple[str, list[str], list[list[str]]]:
    """Title, header and rows of the per-expert table: the ``limit`` experts with the most slots on
    fact-bearing tokens, with the three fact types (and lift) and entities that reach them most; without fact
    annotations, the busiest experts."""
    has_facts = summary["num_fact_tokens"] > 0

    def key(x):
        return x["slots"] * x["fact_share"] if has_facts else x["slots"]

    experts = sorted((x for x in summary["experts"] if x["slots"]), key=key, reverse=True)[:limit]
    header = ["block", "expert", "slots", "mean gate"]
    rows = [[str(x["block"]), str(x["expert"]), str(x["slots"]), f"{x['mean_gate']:.3f}"] for x in experts]
    if not has_facts:
        return f"Busiest knowledge experts (top {len(rows)})", header, rows
    for row, x in zip(rows, experts, strict=True):
        row += [
            pct(x["fact_share"]),
            ", ".join(f"{t['type']} {t['slots']} (lift {t['lift']:.2f})" for t in x["types"][:3]),
            ", ".join(f"{w['entity']} {w['slots']}" for w in x["entities"][:3]),
        ]
    title = f"Knowledge experts most reached by fact-bearing tokens (top {len(rows)})"
    return title, [*header, "on facts", "fact types", "entities"], rows


def token_layers(doc: TracedDoc) -> list[list[list[list]]]:
    """Per token, per layer, the consulted ``[expert, gate]`` pairs (empty: not consulted)."""
    ids_SLK = doc.expert_ids_LSK.permute(1, 0, 2).tolist()
    gates_SLK = doc.gates_LSK.permute(1, 0, 2).tolist()
    return [
        [[[e, round(g, 6)] for e, g in zip(ids_K, gates_K, strict=True) if e != NOT_CONSULTED]
         for ids_K, gates_K in zip(ids_LK, gates_LK, strict=True)]
        for ids_LK, gates_LK in zip(ids_SLK, gates_SLK, strict=True)
    ]


def doc_record(doc: TracedDoc) -> dict:
    """The JSON form of one traced document."""
    return {
        "text": doc.text,
        "facts": [f._asdict() for f in doc.facts],
        "tokens": [
            {**t._asdict(), "layers": layers} for t, layers in zip(doc.tokens, token_layers(doc), strict=True)
        ],
    }


def describe(trace: KnowledgeTrace, source: str, codec: TextCodec) -> dict:
    """What every view says about the run: ``source`` (the model), ``tokens_from`` (the codec),
    ``moe_blocks``, ``num_experts``, ``top_k``."""
    return {"source": source, "tokens_from": codec.description, "moe_blocks": trace.moe_blocks,
            "num_experts": trace.num_experts, "top_k": trace.top_k}


def trace_record(docs: list[TracedDoc], summary: dict, meta: dict) -> dict:
    """The whole raw trace as plain JSON-able values (what ``--json`` writes); ``meta`` from ``describe``."""
    documents = [doc_record(d) for d in docs]
    return {"format": FORMAT, "version": VERSION, **meta, "summary": summary, "documents": documents}

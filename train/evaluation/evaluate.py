"""Evaluate a checkpoint on the synthetic world.

    python -m pure_reasoner.train.evaluation --checkpoint DIR [--splits ...] [--json PATH]

Per split and ablation (base, knowledge_off, reasoning_off; by name the mean ablations knowledge_mean and
answer_mean): log-likelihood multiple-choice accuracy, its chance-adjusted value and Wilson interval, the accuracy
per attribute asked (``by_attribute``), and exact-match greedy generation (for the ablations in ``--generate``,
default base only: each costs about one more multiple-choice pass); then the decoupling score, counterfactual
faithfulness (also per attribute), knowledge stored in bits per knowledge-expert parameter and routing specificity
(definitions: ``train.evaluation.scores``).

The mean ablations apply one constant per MoE layer, recorded on a fixed reference set of the world
(``train.evaluation.mean_reference``); with ``--json PATH`` it is written next to the report (``PATH`` with the suffix
``.means.safetensors``) and described in it (``mean_reference``); ``--mean-reference FILE`` applies a stored one.

The checkpoint directory holds ``config.json`` + ``model.safetensors`` (``moe.checkpoint``), optionally
``tokenizer.json`` (else byte-level ids: token = UTF-8 byte) and ``world.json`` (the WorldConfig it was trained
on; else pass ``--world PATH``). ``--world DIR`` may also name a world directory (``docs/world_schema.md``): its
eval split files are scored, its ``reference.jsonl`` is the mean ablations' reference set, and the knowledge-bits
estimate runs only when its manifest names a generator (else the report lists it under ``not_measured``).

Shape legend: B batch, S sequence, V vocabulary, L MoE layers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.moe.checkpoint import FFN_FILE, load_pretrained
from pure_reasoner.moe.interventions import mean_ablation, reasoning_off
from pure_reasoner.moe.model import LMOutput
from pure_reasoner.train import data
from pure_reasoner.train.evaluation import mean_reference as er
from pure_reasoner.train.evaluation import scores as em
from pure_reasoner.train.evaluation.batches import encode_pairs, fit, padded_batches
from pure_reasoner.train.world.disk import MENTION_TYPES, WorldDir, load_world
from pure_reasoner.train.world.generator import SPLITS, World, build_world, load_world_config
from pure_reasoner.train.world.splits import CLOSED_BOOK_SPLITS, split_examples
from pure_reasoner.train.world.text import ATTRIBUTES, BIO_TEMPLATES, continuation, prefix_of

# The ablations: knowledge_off is the model's own switch; reasoning_off, knowledge_mean and answer_mean are
# ``moe.interventions`` applied around the call (``ablated_forward``): knowledge_mean: every consulting token gets
# the reference's per-layer constant ``knowledge_LD``; answer_mean: only the positions that predict a scored
# continuation (multiple choice only, no generation) get ``answer_LD``, the rest keep their own outputs.
ABLATIONS = ("base", "knowledge_off", "reasoning_off", "knowledge_mean", "answer_mean")
MEAN_ABLATIONS = ("knowledge_mean", "answer_mean")
# What --ablations runs unless told: the mean ablations (the pure reasoner's layer only) are asked for by name.
DEFAULT_ABLATIONS = ("base", "knowledge_off", "reasoning_off")
STOP = ("\n", ".")


def can_generate(ablation: str) -> bool:
    """Whether greedy generation can run under ``ablation`` (answer_mean needs the continuations it scores)."""
    return ablation != "answer_mean"


def ablated_forward(model: PureReasonerLM, idx_BS: torch.Tensor, ablation: str, *,
                    answer_BS: torch.Tensor | None = None, reference: er.MeanReference | None = None) -> LMOutput:
    """``model(idx_BS)`` (on the model's device) under ``ablation``.

    Args:
        idx_BS: [B, S] ids; answer_BS: [B, S] bool, the positions predicting a scored continuation (answer_mean);
        reference: the mean ablations' constants (``train.evaluation.mean_reference``).
    """
    device = _device(model)
    if ablation not in MEAN_ABLATIONS:
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        with reasoning_off(model) if ablation == "reasoning_off" else nullcontext():
            return model(idx_BS.to(device), knowledge_off=ablation == "knowledge_off")
    if reference is None:
        raise ValueError(f"ablation {ablation!r} needs the reference means (mean_reference.reference_means)")
    if ablation == "answer_mean" and answer_BS is None:
        raise ValueError("ablation 'answer_mean' scores given continuations only; it cannot generate")
    means_LD = reference.knowledge_LD if ablation == "knowledge_mean" else reference.answer_LD
    mask_BS = None if ablation == "knowledge_mean" else answer_BS.to(device)
    with mean_ablation(model, means_LD.to(device), mask_BS):
        return model(idx_BS.to(device))


class Codec:
    """Text <-> token ids: a ``tokenizers`` file, or UTF-8 bytes when there is none."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.name = "tokenizer.json" if tokenizer is not None else "bytes"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and, per token, the [begin, end) character span of ``text`` it covers (a byte of a
        multi-byte character covers that character)."""
        if self.tokenizer is not None:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
            return encoding.ids, list(encoding.offsets)
        return self.encode(text), [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_codec(directory: str | Path, vocab_size: int) -> Codec:
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception type for malformed files
            raise ValueError(f"{path} is not a readable tokenizers file: {err}") from err
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(f"{path} has {tokenizer.get_vocab_size()} tokens but the model's vocab_size={vocab_size}")
        return Codec(tokenizer)
    if vocab_size < 256:
        raise ValueError(f"{directory} has no tokenizer.json and vocab_size={vocab_size} < 256 byte ids")
    return Codec()


def load(directory: str | Path, device: str = "cpu") -> tuple[PureReasonerLM, Codec]:
    """The model (eval mode) and its codec from a checkpoint directory."""
    if (Path(directory) / FFN_FILE).is_file():  # the residual_moe baseline
        from pure_reasoner.train.baselines import load_residual_pretrained

        model = load_residual_pretrained(Path(directory), map_location=device).eval()
    else:
        model = load_pretrained(directory, map_location=device).eval()
    return model, load_codec(directory, model.cfg.vocab_size)


def score_continuations(model: PureReasonerLM, codec: Codec, pairs: Sequence[tuple[str, str]], *,
                        ablation: str = "base", batch_size: int = 16,
                        reference: er.MeanReference | None = None) -> tuple[list[float], list[bool], int]:
    """Log-likelihood of each continuation string given its context string (see ``score_ids``)."""
    return score_ids(model, [(codec.encode(c), codec.encode(t)) for c, t in pairs], ablation=ablation,
                     batch_size=batch_size, reference=reference)


@torch.no_grad()
def score_ids(model: PureReasonerLM, pairs: Sequence[tuple[list[int], list[int]]], *, ablation: str = "base",
              batch_size: int = 16, reference: er.MeanReference | None = None) -> tuple[list[float], list[bool], int]:
    """Log-likelihood of each continuation given its context, as token ids (``reference``: the mean ablations').

    Returns:
        logprobs (natural log, summed over continuation tokens), whether each continuation is the greedy one,
        and how many contexts were cut from the left to fit ``max_seq_len``.
    """
    encoded, truncated = encode_pairs(pairs, model.cfg.max_seq_len + 1)  # inputs are ids[:-1]
    logprobs, greedy = [0.0] * len(pairs), [False] * len(pairs)
    for rows, idx_BS, answer_BS, _ in padded_batches(encoded, batch_size):
        out = ablated_forward(model, idx_BS, ablation, answer_BS=answer_BS, reference=reference)
        logp_BSV = F.log_softmax(out.logits_BSV.float(), -1).cpu()
        for b, i in enumerate(rows):
            ids, n = encoded[i]
            target = torch.tensor(ids[-n:])
            logp_NV = logp_BSV[b, len(ids) - 1 - n : len(ids) - 1]
            logprobs[i] = float(logp_NV.gather(1, target[:, None]).double().sum())  # fp64: no rounding of its own
            greedy[i] = bool((logp_NV.argmax(-1) == target).all())
    return logprobs, greedy, truncated


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(model: PureReasonerLM, codec: Codec, prompts: Sequence[str], max_new_tokens: int, *,
                    stop: Sequence[str] = STOP, ablation: str = "base", batch_size: int = 16,
                    reference: er.MeanReference | None = None) -> list[str]:
    """Greedy continuations, each cut at the first stop string. Batched with right padding: causal attention
    makes a row's logits at its own last position independent of the padding after it."""
    if not can_generate(ablation):
        raise ValueError(f"ablation {ablation!r} scores given continuations only; it cannot generate")
    limit = model.cfg.max_seq_len
    outputs = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        seqs = {i: codec.encode(prompts[i]) for i in rows}
        new = {i: [] for i in rows}
        active = set(rows)
        for _ in range(max_new_tokens):
            if not active:
                break
            live = sorted(active)
            ctx = {i: fit(seqs[i] + new[i], limit) for i in live}
            idx_BS = torch.zeros(len(live), max(len(c) for c in ctx.values()), dtype=torch.long)
            for b, i in enumerate(live):
                idx_BS[b, : len(ctx[i])] = torch.tensor(ctx[i])
            logits_BSV = ablated_forward(model, idx_BS, ablation, reference=reference).logits_BSV
            for b, i in enumerate(live):
                new[i].append(int(logits_BSV[b, len(ctx[i]) - 1].argmax()))
                text = codec.decode(new[i])
                if any(s in text for s in stop):
                    active.discard(i)
        for i in rows:
            text = codec.decode(new[i])
            cut = min((text.find(s) for s in stop if s in text), default=len(text))
            outputs[i] = text[:cut]
    return outputs


@torch.no_grad()
def consult_map(model: PureReasonerLM, idx_BS: torch.Tensor) -> torch.Tensor:
    """[L, B, S] bool: whether each token consulted any knowledge expert in each MoE layer (router hook)."""
    layers = model.moe_layers()
    if any(getattr(layer, "router", None) is None for layer in layers):  # residual_moe: every token is routed
        return torch.ones(len(layers), *idx_BS.shape, dtype=torch.bool)
    captured = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out.expert_ids_TK))
             for layer in model.moe_layers()]
    try:
        model(idx_BS)
    finally:
        for hook in hooks:
            hook.remove()
    if not captured:
        return torch.zeros(0, *idx_BS.shape, dtype=torch.bool)
    return torch.stack([(ids_TK >= 0).any(-1).view(idx_BS.shape) for ids_TK in captured]).cpu()


def _name_spans(ex: dict) -> list[tuple[int, int]]:
    """The [start, end) character spans naming what an example's facts are about: the built-in world's typed
    ``spans`` of a mention type, or a world directory's ``mentions``."""
    spans = ex.get("mentions") or [sp for sp in ex.get("spans") or [] if sp.get("type") in MENTION_TYPES]
    return [(sp["start"], sp["end"]) for sp in spans]


def routing_specificity(model: PureReasonerLM, codec: Codec, examples: Sequence[dict], batch_size: int = 16) -> dict:
    """Consult rates on answer positions (those that predict an answer token) vs other positions, per MoE layer
    and over all layers. The other positions are split once more into the prompt tokens that overlap the names
    the example is about (``_name_spans``; ``key_*``: where ``objective.consult_targets=recall_keys`` teaches the
    experts to be consulted) and the rest (``rest_*``; ``ratio_beyond_keys`` = answer rate / rest rate)."""
    limit = model.cfg.max_seq_len + 1
    num_layers = len(model.moe_layers())
    hits = {group: torch.zeros(num_layers) for group in ("answer", "key", "rest")}
    counts = dict.fromkeys(hits, 0)
    for start in range(0, len(examples), batch_size):
        batch = []
        for ex in examples[start : start + batch_size]:
            prompt_ids, offsets = codec.encode_offsets(ex["prompt"])
            answer_ids, stop_ids = codec.encode(" " + ex["answer"]), codec.encode(".")
            ids = fit(prompt_ids + answer_ids + stop_ids, limit)
            kept = len(ids) - len(answer_ids) - len(stop_ids)  # prompt tokens left after the cut (the last ones)
            cut = len(prompt_ids) - kept
            names = [i - cut for i, hit in enumerate(data.span_overlaps(offsets, _name_spans(ex))) if hit and i >= cut]
            batch.append((ids[:-1], kept - 1, len(answer_ids), names))  # position kept - 1 predicts the answer
        idx_BS = torch.zeros(len(batch), max(len(ids) for ids, *_ in batch), dtype=torch.long)
        masks = {group: torch.zeros(idx_BS.shape, dtype=torch.bool) for group in ("answer", "key", "valid")}
        for b, (ids, first, n, names) in enumerate(batch):
            idx_BS[b, : len(ids)] = torch.tensor(ids)
            masks["valid"][b, : len(ids)] = True
            masks["answer"][b, max(first, 0) : first + n] = True
            masks["key"][b, names] = True
        masks["key"] &= ~masks["answer"]
        masks["rest"] = masks["valid"] & ~masks["answer"] & ~masks["key"]
        consulted_LBS = consult_map(model, idx_BS.to(_device(model)))
        for group in hits:
            hits[group] += (consulted_LBS & masks[group]).flatten(1).sum(1)
            counts[group] += int(masks[group].sum())

    def rates(answer: float, key: float, rest: float) -> dict:
        return em.routing_specificity(answer, counts["answer"], rest, counts["rest"], key, counts["key"])

    per_layer = [rates(*map(float, layer)) for layer in zip(*hits.values(), strict=True)]
    overall = rates(*(float(h.mean()) if num_layers else 0.0 for h in hits.values()))
    return {**overall, "per_layer": per_layer}


def knowledge_bits(model: PureReasonerLM, codec: Codec, world: World, max_people: int, batch_size: int = 16,
                   ablation: str = "base", reference: er.MeanReference | None = None) -> dict:
    """Bits about the known people's attribute values held by the model (``eval_metrics.knowledge_bits``),
    estimated on a uniform sample of people and scaled to all of them.

    Each value is scored after its biography prefix (``"{name} studied at"``). Where the value set is listed
    (every attribute but birth_date) the model is restricted to it (``eval_metrics.normalized_logprobs``):
    the question is what the model knows about *which* value, not how it phrases it. ``bits`` is
    ``eval_metrics.bits_lower_bound`` of the per-attribute bits (a per-attribute fallback to the uniform
    code); ``raw_bits`` their plain sum. ``fano_bits``: ``eval_metrics.fano_bits`` of the accuracy of the
    model's most likely value in the set, per listed attribute (birth dates, with no listed set, count 0),
    a bound that confident errors cannot drive negative. ``ablation``: run the model under it (``ABLATIONS``;
    ``reference``: the mean ablations' constants)."""
    people = random.Random(f"{world.cfg.seed}:bits").sample(world.people, min(max_people, len(world.people)))
    scale = len(world.people) / len(people)
    per_attribute = {}
    fano_total = 0.0
    for attribute in ATTRIBUTES:
        prefix = prefix_of(BIO_TEMPLATES[attribute][0])
        space = world.value_space(attribute)
        golds = [world.values(p)[attribute] for p in people]
        if space is None:
            pairs = [(prefix.format(name=p.name), continuation(g)) for p, g in zip(people, golds, strict=True)]
            logprobs, _, _ = score_continuations(model, codec, pairs, batch_size=batch_size, ablation=ablation,
                                                 reference=reference)
            fano = picked = None
        else:
            pairs = [(prefix.format(name=p.name), continuation(v)) for p in people for v in space]
            flat, _, _ = score_continuations(model, codec, pairs, batch_size=batch_size, ablation=ablation,
                                             reference=reference)
            rows = [flat[i * len(space) : (i + 1) * len(space)] for i in range(len(people))]
            logprobs = em.normalized_logprobs(rows, [space.index(g) for g in golds])
            picked = em.accuracy([max(range(len(space)), key=row.__getitem__) == space.index(g)
                                  for row, g in zip(rows, golds, strict=True)])
            fano = em.fano_bits(picked, len(space), len(world.people))
            fano_total += fano
        size = world.num_values(attribute)
        bits = em.knowledge_bits(logprobs, [size] * len(people)) * scale
        per_attribute[attribute] = {"bits": bits, "max_bits": len(world.people) * math.log2(size),
                                    "normalized": space is not None, "accuracy": picked, "fano_bits": fano}
    raw = sum(v["bits"] for v in per_attribute.values())
    total = em.bits_lower_bound([v["bits"] for v in per_attribute.values()])
    expert_params = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    return {"ablation": ablation, "bits": total, "raw_bits": raw, "fano_bits": fano_total,
            "fano_bits_per_knowledge_param": em.per_parameter(fano_total, expert_params),
            "max_bits": sum(v["max_bits"] for v in per_attribute.values()),
            "people_scored": len(people), "people": len(world.people), "per_attribute": per_attribute,
            "knowledge_expert_params": expert_params, "params": all_params,
            "bits_per_knowledge_param": em.per_parameter(total, expert_params),
            "bits_per_param": em.per_parameter(total, all_params)}


@dataclass
class SplitResult:
    n: int
    chance: float
    acc: float
    acc_adjusted: float
    acc_interval: tuple[float, float]
    well_above_chance: bool
    exact_match: float | None
    truncated: int
    predictions: list[str]
    generations: list[str] | None
    by_attribute: dict[str, dict]  # the attribute asked -> {n, acc, acc_adjusted}


def evaluate_split(model: PureReasonerLM, codec: Codec, examples: Sequence[dict], ablation: str, *,
                   batch_size: int = 16, generate: bool = True,
                   reference: er.MeanReference | None = None) -> SplitResult:
    pairs = [(ex["prompt"], continuation(c)) for ex in examples for c in ex["choices"]]
    logprobs, _, truncated = score_continuations(model, codec, pairs, ablation=ablation, batch_size=batch_size,
                                                 reference=reference)
    predictions, correct, offset = [], [], 0
    for ex in examples:
        scores = logprobs[offset : offset + len(ex["choices"])]
        offset += len(ex["choices"])
        best = max(range(len(scores)), key=scores.__getitem__)
        predictions.append(ex["choices"][best])
        correct.append(best == ex["gold"])
    chance = em.chance_level([len(ex["choices"]) for ex in examples])
    acc, hits = em.accuracy(correct), sum(correct)
    generations = exact = None
    if generate:
        longest = max(len(codec.encode(continuation(ex["answer"]))) for ex in examples)
        generations = greedy_generate(model, codec, [ex["prompt"] for ex in examples], longest + 2,
                                      ablation=ablation, batch_size=batch_size, reference=reference)
        exact = em.accuracy([g.strip() == ex["answer"] for g, ex in zip(generations, examples, strict=True)])
    by_attribute = em.by_key([ex["attribute"] for ex in examples], correct, [len(ex["choices"]) for ex in examples],
                             metric=_accuracy_cell)
    return SplitResult(len(examples), chance, acc, em.chance_adjusted(acc, chance),
                       em.wilson_interval(hits, len(examples)), em.well_above_chance(hits, len(examples), chance),
                       exact, truncated // max(len(examples[0]["choices"]), 1), predictions, generations,
                       by_attribute)


def _accuracy_cell(correct: list[bool], num_choices: list[int]) -> dict:
    acc = em.accuracy(correct)
    return {"n": len(correct), "acc": acc, "acc_adjusted": em.chance_adjusted(acc, em.chance_level(num_choices))}


def _decoupling(results: dict, closed: str, opened: str) -> dict:
    base_c, off_c = results[closed]["base"], results[closed]["knowledge_off"]
    base_o, off_o = results[opened]["base"], results[opened]["knowledge_off"]
    score, reason = em.decoupling_score(base_c.acc_adjusted, off_c.acc_adjusted, base_o.acc_adjusted,
                                        off_o.acc_adjusted, base_o.well_above_chance)
    return {"closed": closed, "open": opened, "score": score, "reason": reason,
            "closed_relative_drop": em.relative_drop(base_c.acc_adjusted, off_c.acc_adjusted),
            "open_relative_drop": em.relative_drop(base_o.acc_adjusted, off_o.acc_adjusted),
            "open_min_adjusted": em.OPEN_BOOK_MIN_ADJUSTED}


def mean_reference(model: PureReasonerLM, codec: Codec, world: World | WorldDir, ablations: Sequence[str],
                   path: str | Path | None = None, batch_size: int = 16) -> er.MeanReference | None:
    """The mean ablations' constants when ``ablations`` has one (else None): read from ``path``, or recorded on
    the world's reference set (``train.evaluation.mean_reference``; a world directory's ``reference.jsonl``)."""
    if not set(ablations) & set(MEAN_ABLATIONS):
        return None
    if path is not None:
        return er.load_reference(path)
    pairs = world.reference_pairs() if isinstance(world, WorldDir) else world
    return er.reference_means(model, codec, pairs, batch_size=batch_size)


def evaluate(model: PureReasonerLM, codec: Codec, world: World | WorldDir, splits: Sequence[str] = SPLITS,
             ablations: Sequence[str] = DEFAULT_ABLATIONS, *, max_examples: int | None = None,
             generate: Sequence[str] = ("base",), bits_people: int = 200, batch_size: int = 16,
             reference: er.MeanReference | None = None) -> dict:
    """The full report as a JSON-ready dict (see the module docstring). ``world``: the built-in World or a
    world directory. ``reference``: the mean ablations' constants (default: ``mean_reference`` records them when
    a mean ablation is asked for)."""
    on_disk = isinstance(world, WorldDir)
    examples = {s: (world.examples(s) if on_disk else split_examples(world, s))[:max_examples] for s in splits}
    generated = world.generated if on_disk else world
    reference = reference or mean_reference(model, codec, world, ablations, batch_size=batch_size)
    results = {s: {a: evaluate_split(model, codec, examples[s], a, batch_size=batch_size, generate=a in generate,
                                     reference=reference)
                   for a in ablations} for s in splits}
    report = {"splits": {s: {a: {k: v for k, v in asdict(r).items() if k not in ("predictions", "generations")}
                             for a, r in by_ablation.items()} for s, by_ablation in results.items()}}
    if reference is not None:
        report["mean_reference"] = er.describe(reference)
    report["decoupling"] = [_decoupling(results, c, o) for c, o in
                            (("closed_book", "open_book"), ("closed_book_two_hop", "open_book_two_hop"))
                            if c in splits and o in splits and {"base", "knowledge_off"} <= set(ablations)]
    if "counterfactual" in splits:
        exs = examples["counterfactual"]
        stated, memorised = [ex["answer"] for ex in exs], [ex["memorised"] for ex in exs]
        attributes = [ex["attribute"] for ex in exs]
        report["faithfulness"] = {
            a: {"choice": {**em.faithfulness(r.predictions, stated, memorised),
                           "by_attribute": em.by_key(attributes, r.predictions, stated, memorised,
                                                     metric=em.faithfulness)},
                "generation": em.faithfulness([g.strip() for g in r.generations], stated, memorised)
                if r.generations is not None else None}
            for a, r in results["counterfactual"].items()}
    if bits_people and generated is None:
        # the estimate scores every value of an attribute's set after a biography prefix: the generator's
        bits_people = 0
        report.setdefault("not_measured", {})["knowledge_bits"] = "the world directory has no generator"
    report["knowledge_bits"] = knowledge_bits(model, codec, generated, bits_people, batch_size) if bits_people \
        else None
    if bits_people and "knowledge_off" in ablations and model.moe_layers():
        # what the model still knows with its knowledge experts off: the difference is what needs them
        report["knowledge_bits_knowledge_off"] = knowledge_bits(model, codec, generated, bits_people, batch_size,
                                                                ablation="knowledge_off")
    if bits_people and "knowledge_mean" in ablations and model.moe_layers():
        # the experts' output replaced by its mean: what survives needs the experts, but not per person
        report["knowledge_bits_knowledge_mean"] = knowledge_bits(model, codec, generated, bits_people, batch_size,
                                                                 ablation="knowledge_mean", reference=reference)
    groups = {"closed_book": [s for s in splits if s in CLOSED_BOOK_SPLITS and s != "comparison"],
              "open_book": [s for s in splits if s in ("open_book", "open_book_two_hop")]}
    # target_rate: the consult rate the router is held at in training, what the overall rate is measured against
    report["routing"] = {g: {**routing_specificity(model, codec, [ex for s in ss for ex in examples[s]], batch_size),
                             "target_rate": model.cfg.knowledge.consult_rate}
                         for g, ss in groups.items() if ss and model.moe_layers()}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.evaluation",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="directory with config.json + model.safetensors")
    parser.add_argument("--splits", default=None,
                        help=f"comma-separated, from {','.join(SPLITS)} (default: all the world has)")
    parser.add_argument("--ablations", default=",".join(DEFAULT_ABLATIONS),
                        help=f"comma-separated, from {','.join(ABLATIONS)}")
    parser.add_argument("--world", default=None,
                        help="WorldConfig JSON or a world directory (default: CHECKPOINT/world.json)")
    parser.add_argument("--max-examples", type=int, default=None, help="per split (default: all of the world's)")
    parser.add_argument("--bits-people", type=int, default=200, help="people sampled for the bits estimate; 0: skip")
    parser.add_argument("--generate", default="base",
                        help="ablations to run exact-match generation for (comma-separated, 'all' or 'none'); "
                             "greedy generation costs about as much as the multiple-choice scoring per ablation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mean-reference", default=None,
                        help="apply this stored reference (a .means.safetensors file) in the mean ablations instead "
                             "of recording one on the world")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    ablations = args.ablations.split(",")
    world_path = Path(args.world) if args.world else Path(args.checkpoint) / "world.json"
    try:
        world = load_world(world_path) if world_path.is_dir() else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    splits = args.splits.split(",") if args.splits else list(world.splits if world is not None else SPLITS)
    generable = tuple(a for a in ablations if a in ABLATIONS and can_generate(a))
    generate = {"all": generable, "none": []}.get(args.generate, args.generate.split(","))
    for given, known, what, may_be_empty in ((splits, SPLITS, "split", False),
                                             (ablations, tuple(ABLATIONS), "ablation", False),
                                             (generate, generable, "--generate ablation", True)):
        bad = [x for x in given if x not in known]
        if bad or not (given or may_be_empty):
            parser.error(f"unknown {what}(s) {bad}; choose from {','.join(known)}")
    for name in ("max_examples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.bits_people < 0:
        parser.error(f"--bits-people must be >= 0, got {args.bits_people}")
    try:
        if world is None:
            if not world_path.is_file():
                raise ValueError(f"no world config at {world_path}; pass --world PATH")
            world = build_world(load_world_config(world_path))
        for split in splits:
            if isinstance(world, WorldDir):
                world.examples(split)  # a missing or malformed split file fails here, before any scoring
        model, codec = load(args.checkpoint, args.device)
        reference = mean_reference(model, codec, world, ablations, args.mean_reference, args.batch_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    described = world.describe() if isinstance(world, WorldDir) else asdict(world.cfg)
    report = {"checkpoint": str(args.checkpoint), "tokenizer": codec.name, "world": described,
              **evaluate(model, codec, world, splits, ablations, max_examples=args.max_examples,
                         generate=generate, bits_people=args.bits_people, batch_size=args.batch_size,
                         reference=reference)}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
        if reference is not None:
            er.save_reference(reference, reference_path(args.json))
    _print_summary(report)
    return 0


def reference_path(report_path: str | Path) -> Path:
    """Where the mean ablations' reference of a report is stored: ``r.json`` -> ``r.means.safetensors``."""
    return Path(report_path).with_suffix(".means.safetensors")


def _print_summary(report: dict) -> None:
    for split, by_ablation in report["splits"].items():
        cells = "  ".join(f"{a}: acc {r['acc']:.3f} adj {r['acc_adjusted']:+.3f}"
                          + (f" em {r['exact_match']:.3f}" if r["exact_match"] is not None else "")
                          for a, r in by_ablation.items())
        print(f"{split:>20}  n={next(iter(by_ablation.values()))['n']:<4} {cells}")
    for d in report["decoupling"]:
        print(f"decoupling {d['closed']} vs {d['open']}: {d['score']} ({d['reason']})")
    for ablation, f in report.get("faithfulness", {}).items():
        cells = "  ".join(f"{a} {em.fmt(c['faithfulness'], '.2f')}" for a, c in f["choice"]["by_attribute"].items())
        print(f"faithfulness {ablation}: {em.fmt(f['choice']['faithfulness'], '.2f')} ({cells})")
    if report.get("knowledge_bits"):
        kb = report["knowledge_bits"]
        print(f"knowledge: {kb['bits']:.1f} bits of {kb['max_bits']:.1f}; per knowledge-expert param "
              f"{kb['bits_per_knowledge_param']}; Fano bound {kb['fano_bits']:.1f} bits"
              + (f" ({report['knowledge_bits_knowledge_off']['fano_bits']:.1f} with knowledge off)"
                 if report.get("knowledge_bits_knowledge_off") else ""))
    for group, r in report["routing"].items():
        print(f"routing {group}: answer {r['answer_rate']} other {r['other_rate']} ratio {r['ratio']}")


if __name__ == "__main__":
    raise SystemExit(main())

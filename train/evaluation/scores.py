"""Metrics of the knowledge-vs-reasoning evaluation, as pure functions on numbers.

Definitions (the evaluation report uses exactly these):

chance-adjusted accuracy
    ``(acc - chance) / (1 - chance)`` with ``chance`` the mean over examples of ``1 / num_choices``: 0 at
    chance, 1 when perfect, negative below chance.

decoupling score (under the knowledge-off ablation)
    ``relative_drop(closed) - relative_drop(open)``, ``relative_drop = (base - ablated) / base`` on
    chance-adjusted accuracies. 1 is perfect separation (closed book falls to chance, open book keeps all of
    it); 0 means knowledge-off hurts both alike. Reported only where the open-book base is *well above chance*
    (``well_above_chance``: chance-adjusted >= 0.25 AND the 95% Wilson lower bound of the raw accuracy above
    chance, so a handful of lucky examples cannot qualify) and the closed-book base is above chance (else the
    relative drop is undefined). Otherwise ``None`` with the reason.

counterfactual faithfulness
    Over counterfactual examples, the share of predictions equal to the value stated in the context
    (``follows_context``), equal to the memorised (trained) value (``follows_memory``), and
    ``faithfulness = follows_context / (follows_context + follows_memory)``.

knowledge stored, in bits (Allen-Zhu & Li, Physics of Language Models 3.3, the value term of their bound)
    Each attribute value was drawn uniformly from ``|V_a|`` values, so without the model the values of N people
    cost ``N * sum_a log2 |V_a|`` bits. With the model as an arithmetic coder they cost
    ``sum_{i,a} -log2 p(value_ia | prompt_ia)`` bits, the model's log-likelihood of the value string (plus a
    final ``.`` that makes the value strings prefix-free, so the probabilities form a valid code). The
    difference, ``sum_{i,a} (log2 |V_a| + log2 p(value_ia | prompt_ia))``, lower-bounds (in expectation) the
    information about the values that the weights hold. As in 3.3 the names are given, not counted; derived
    (two-hop) facts are not counted. It can be negative (a model worse than uniform): that is evidence of no
    knowledge, reported as it is. ``bits per knowledge-expert parameter`` divides it by the parameters of the
    knowledge experts (3.3 reports ~2 bits per parameter for all parameters of well-trained GPT-2s).

routing specificity
    Consult rate on answer positions (those whose next token is an answer token) vs all other positions, and
    their ratio; computed separately on closed-book and open-book prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

OPEN_BOOK_MIN_ADJUSTED = 0.25


def accuracy(correct: Sequence[bool]) -> float:
    if not correct:
        raise ValueError("accuracy of zero examples")
    return sum(map(bool, correct)) / len(correct)


def chance_level(num_choices: Sequence[int]) -> float:
    """Expected accuracy of uniform guessing: mean of 1/n over examples."""
    if not num_choices or min(num_choices) < 1:
        raise ValueError(f"num_choices must be a non-empty list of counts >= 1, got {list(num_choices)[:5]}")
    return sum(1.0 / n for n in num_choices) / len(num_choices)


def chance_adjusted(acc: float, chance: float) -> float:
    """``(acc - chance) / (1 - chance)``: 0 at chance, 1 when perfect."""
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (acc - chance) / (1.0 - chance)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a binomial proportion."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def well_above_chance(successes: int, n: int, chance: float, min_adjusted: float = OPEN_BOOK_MIN_ADJUSTED) -> bool:
    """Chance-adjusted accuracy >= ``min_adjusted`` and the Wilson lower bound of the accuracy above chance."""
    return chance_adjusted(successes / n, chance) >= min_adjusted and wilson_interval(successes, n)[0] > chance


def relative_drop(base: float, ablated: float) -> float | None:
    """``(base - ablated) / base``; None when ``base <= 0`` (nothing to lose)."""
    return None if base <= 0 else (base - ablated) / base


def decoupling_score(closed_base: float, closed_off: float, open_base: float, open_off: float,
                     open_well_above_chance: bool) -> tuple[float | None, str]:
    """Relative closed-book drop minus relative open-book drop (chance-adjusted accuracies, knowledge off).

    Returns (score, reason): score None with the reason when it is not defined.
    """
    if not open_well_above_chance:
        return None, f"open book not well above chance (chance-adjusted {open_base:.3f})"
    closed_drop = relative_drop(closed_base, closed_off)
    if closed_drop is None:
        return None, f"closed book not above chance (chance-adjusted {closed_base:.3f})"
    return closed_drop - relative_drop(open_base, open_off), "ok"


def faithfulness(predictions: Sequence[str], stated: Sequence[str], memorised: Sequence[str]) -> dict:
    """Shares of predictions following the context, the memory, or neither; faithfulness = ctx / (ctx + mem)."""
    if not len(predictions) == len(stated) == len(memorised) or not predictions:
        raise ValueError(f"need equal non-zero lengths, got {len(predictions)}, {len(stated)}, {len(memorised)}")
    n = len(predictions)
    ctx = sum(p == s for p, s in zip(predictions, stated, strict=True)) / n
    mem = sum(p == m for p, m in zip(predictions, memorised, strict=True)) / n
    return {"follows_context": ctx, "follows_memory": mem, "neither": 1.0 - ctx - mem,
            "faithfulness": ctx / (ctx + mem) if ctx + mem > 0 else None, "n": n}


def fmt(x: float | None, spec: str = ".3f") -> str:
    """A metric for a table or a log line: ``format(x, spec)``, or an em dash where it was not measured."""
    return "—" if x is None else format(x, spec)


def by_key(keys: Sequence[str], *columns: Sequence, metric) -> dict[str, object]:
    """``metric(*columns)`` restricted to each distinct key's rows, keys sorted: a score broken down by the
    attribute asked (``by_key(attrs, correct, accuracy)``, ``by_key(attrs, preds, stated, memorised,
    faithfulness)``)."""
    if any(len(c) != len(keys) for c in columns):
        raise ValueError(f"{len(keys)} keys for columns of lengths {[len(c) for c in columns]}")
    rows = {k: [i for i, key in enumerate(keys) if key == k] for k in sorted(set(keys))}
    return {k: metric(*([c[i] for i in idx] for c in columns)) for k, idx in rows.items()}


def knowledge_bits(value_logprobs: Sequence[float], num_values: Sequence[int]) -> float:
    """``sum_i (log2 num_values_i + logprob_i / ln 2)``: bits about uniformly drawn values held by the model.

    Args:
        value_logprobs: natural-log probability the model gives each fact's value string (<= 0).
        num_values: size of the uniform value set each fact was drawn from.
    """
    if len(value_logprobs) != len(num_values):
        raise ValueError(f"{len(value_logprobs)} log-probabilities for {len(num_values)} value-set sizes")
    if any(lp > 1e-6 for lp in value_logprobs) or any(n < 1 for n in num_values):
        raise ValueError("log-probabilities must be <= 0 and value-set sizes >= 1")
    return sum(math.log2(n) + lp / math.log(2) for lp, n in zip(value_logprobs, num_values, strict=True))


def normalized_logprobs(value_logprobs_PV: Sequence[Sequence[float]], gold_P: Sequence[int]) -> list[float]:
    """The gold value's log-probability under the model restricted to the value set: row p of
    ``value_logprobs_PV`` holds the model's log-probability of every value of the set for fact p; returns
    ``lp[p, gold_p] - logsumexp(lp[p])`` (a code for values known to come from the set; never below the
    unrestricted log-probability)."""
    if len(value_logprobs_PV) != len(gold_P):
        raise ValueError(f"{len(value_logprobs_PV)} rows of log-probabilities for {len(gold_P)} gold indices")
    out = []
    for row, gold in zip(value_logprobs_PV, gold_P, strict=True):
        if not 0 <= gold < len(row):
            raise ValueError(f"gold index {gold} outside a value set of {len(row)}")
        top = max(row)
        out.append(row[gold] - top - math.log(sum(math.exp(x - top) for x in row)))
    return out


def bits_lower_bound(bits_per_attribute: Sequence[float]) -> float:
    """Total bits with a per-attribute fallback to the uniform code: ``sum max(0, bits_a - 1)`` (one bit per
    attribute says which code is used), so a model worse than uniform on one attribute costs it nothing."""
    return sum(max(0.0, b - 1.0) for b in bits_per_attribute)


def fano_bits(accuracy: float, num_values: int, num_facts: int) -> float:
    """A lower bound on the bits about ``num_facts`` uniformly drawn values (from sets of ``num_values``) that
    a model must hold to pick them with ``accuracy``: by Fano's inequality the information its choices carry
    about the values is at least ``log2 S - h(1 - a) - (1 - a) log2(S - 1)`` per fact (h: binary entropy),
    and by data processing the weights carry at least that. 0 at or below chance; ``log2 S`` per fact at
    a = 1. Unlike ``knowledge_bits`` it cannot be driven negative by confident errors.
    """
    if not 0.0 <= accuracy <= 1.0 or num_values < 1 or num_facts < 0:
        raise ValueError(f"need 0 <= accuracy <= 1, num_values >= 1, num_facts >= 0; got {accuracy}, "
                         f"{num_values}, {num_facts}")
    if num_values == 1 or accuracy <= 1.0 / num_values:
        return 0.0
    err = 1.0 - accuracy
    binary_entropy = 0.0 if err in (0.0, 1.0) else -(err * math.log2(err) + accuracy * math.log2(accuracy))
    return num_facts * max(0.0, math.log2(num_values) - binary_entropy - err * math.log2(num_values - 1))


def per_parameter(bits: float, num_params: int) -> float | None:
    return bits / num_params if num_params > 0 else None


def routing_specificity(consulted_answer: float, answer_tokens: int, consulted_rest: float, rest_tokens: int,
                        consulted_key: float = 0.0, key_tokens: int = 0) -> dict:
    """Consult rates on answer positions, on key positions (the names facts are about) and on the rest.
    ``other_*`` and ``ratio`` count every non-answer position (keys and rest together); ``ratio_beyond_keys``
    divides the answer rate by the rest's alone. None where undefined."""

    def rate(consulted: float, tokens: int) -> float | None:
        return consulted / tokens if tokens else None

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator is not None and denominator else None

    answer_rate = rate(consulted_answer, answer_tokens)
    other_rate = rate(consulted_rest + consulted_key, rest_tokens + key_tokens)
    rest_rate = rate(consulted_rest, rest_tokens)
    return {"answer_rate": answer_rate, "other_rate": other_rate, "ratio": ratio(answer_rate, other_rate),
            "answer_tokens": answer_tokens, "other_tokens": rest_tokens + key_tokens,
            "key_rate": rate(consulted_key, key_tokens), "key_tokens": key_tokens,
            "rest_rate": rest_rate, "rest_tokens": rest_tokens, "ratio_beyond_keys": ratio(answer_rate, rest_rate)}

"""Router-collapse detection over a window of logged steps: pure functions, no tensors kept.

Shape legend: W steps in the window, L MoE layers, E knowledge experts.

Two failure modes of a learned router are named, per layer:
- one expert takes more than ``max_share`` of the layer's expert load on every step of the window;
- the consult rate sits at 0 (knowledge never used) or 1 (the sparse gate does nothing) on every step
  of the window while the configured target lies strictly between them.
"""

from __future__ import annotations

from collections.abc import Sequence

PINNED_EPS = 1e-3  # a consult rate within this of 0 or 1 counts as pinned


def collapse_warnings(
    load_share_WLE: Sequence[Sequence[Sequence[float]]],
    consult_rate_WL: Sequence[Sequence[float]],
    target_rate: float,
    max_share: float,
    window: int,
) -> list[str]:
    """Warnings (one per collapsed layer and mode) for the last ``window`` steps; [] while fewer were seen.

    Args:
        load_share_WLE: per step, per MoE layer, each expert's share of that layer's expert load.
        consult_rate_WL: per step, per MoE layer, the fraction of tokens that consulted knowledge.
        target_rate: the configured consult rate (knowledge.consult_rate).
        max_share: a share above this on every step of the window is a collapse onto one expert.
        window: how many most recent steps must all show the symptom.
    """
    if window < 1 or not 0 < max_share <= 1:
        raise ValueError(f"collapse window must be >= 1 and max_share in (0, 1], got {window}, {max_share}")
    if len(consult_rate_WL) < window:
        return []
    shares, rates = load_share_WLE[-window:], consult_rate_WL[-window:]
    out = []
    for layer in range(len(rates[0])):
        top = [max(step[layer]) if step[layer] else 0.0 for step in shares]
        experts = {max(range(len(step[layer])), key=step[layer].__getitem__) for step in shares if step[layer]}
        if min(top) > max_share and len(experts) == 1:
            out.append(
                f"router collapse in MoE layer {layer}: expert {experts.pop()} took > {max_share:.0%} of the load "
                f"on each of the last {window} steps (min share {min(top):.2f})"
            )
        layer_rates = [step[layer] for step in rates]
        if 0 < target_rate < 1:
            for pinned in (0.0, 1.0):
                if all(abs(r - pinned) <= PINNED_EPS for r in layer_rates):
                    out.append(
                        f"router collapse in MoE layer {layer}: consult rate pinned at {pinned:g} for the last "
                        f"{window} steps (target {target_rate:g})"
                    )
    return out

"""(context, continuation) token-id pairs -> right-padded batches, for scoring
(``train.evaluation.evaluate.score_ids``) and for the mean ablations' reference (``train.evaluation.mean_reference``).

Shape legend: B batch, S sequence (the longest row of the batch, minus one: inputs are ids[:-1]).

Rows are right-padded with id 0. Attention is causal and every other op works per token, so a row's logits at
its own positions do not depend on the padding after them, nor on the other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """rows: indices into the encoded pairs; idx_BS: [B, S] input ids (0 = padding); answer_BS: [B, S] bool,
    the positions that predict a continuation token; valid_BS: [B, S] bool, the positions that are not padding."""

    rows: list[int]
    idx_BS: torch.Tensor
    answer_BS: torch.Tensor
    valid_BS: torch.Tensor


def fit(ids: list[int], limit: int) -> list[int]:
    """Keep the last ``limit`` tokens (the question and answer sit at the end of a prompt)."""
    return ids[-limit:]


def encode_pairs(pairs: Sequence[tuple[list[int], list[int]]], limit: int) -> tuple[list[tuple[list[int], int]], int]:
    """Each pair as (context + continuation ids cut to the last ``limit``, continuation length), and how many
    were cut. Raises ValueError for an empty continuation or one of ``limit`` tokens or more."""
    encoded, truncated = [], 0
    for ctx_ids, cont_ids in pairs:
        if not cont_ids or len(cont_ids) >= limit:
            raise ValueError(f"continuation has {len(cont_ids)} tokens; need 1..{limit - 1}")
        encoded.append((fit([*ctx_ids, *cont_ids], limit), len(cont_ids)))
        truncated += len(ctx_ids) + len(cont_ids) > limit
    return encoded, truncated


def padded_batches(encoded: Sequence[tuple[list[int], int]], batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows, longest first (less padding)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in rows) - 1
        idx_BS = torch.zeros(len(rows), width, dtype=torch.long)
        answer_BS = torch.zeros(len(rows), width, dtype=torch.bool)
        valid_BS = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, i in enumerate(rows):
            ids, n = encoded[i]
            idx_BS[b, : len(ids) - 1] = torch.tensor(ids[:-1])
            answer_BS[b, len(ids) - 1 - n : len(ids) - 1] = True
            valid_BS[b, : len(ids) - 1] = True
        yield Batch(rows, idx_BS, answer_BS, valid_BS)

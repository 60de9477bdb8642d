"""The combine: per-row expert outputs, in sorted-row order, summed back into their tokens.

Shapes: T tokens, K slots per token, S = T*K slots, R rows (a prefix of the sorted order, or all S), D
model dim.

A token's K rows sit at arbitrary sorted positions (grouped by expert), so a scatter-add adds them in an
order set by the routing of the whole batch: ``index_add_`` on CPU follows the sorted order, on CUDA
its atomics follow the thread schedule. Floating-point addition does not associate, so the same token
can then come out with different bits. The deterministic combine places each row back at its slot and
adds slots k = 0..K-1 left to right: the order depends on nothing but K.
"""

from __future__ import annotations

import torch


def combine_rows(
    y_RD: torch.Tensor, slot_R: torch.Tensor, num_tokens: int, top_k: int, deterministic: bool
) -> torch.Tensor:
    """y_TD[t] = sum of the rows r whose slot belongs to token t (``slot_R[r] // K == t``).

    Args:
        y_RD: [R, D] row outputs in sorted-row order (rows of idle slots must be zero or absent).
        slot_R: [R] int64 flat slot (t*K + k) of each row; no slot twice.
        num_tokens: T.
        top_k: K.
        deterministic: add a token's slots in slot order k = 0..K-1 (a fixed order, no atomics), instead
            of one scatter-add in row order.

    Returns:
        y_TD: [T, D] in y's dtype.
    """
    if not deterministic:
        return y_RD.new_zeros(num_tokens, y_RD.shape[1]).index_add_(0, slot_R // top_k, y_RD)
    # Each slot receives at most one row, so this copy has no duplicate index and no order to depend on.
    y_TKD = y_RD.new_zeros(num_tokens * top_k, y_RD.shape[1]).index_copy_(0, slot_R, y_RD).view(num_tokens, top_k, -1)
    y_TD = y_TKD[:, 0].clone()
    for k in range(1, top_k):
        y_TD += y_TKD[:, k]
    return y_TD

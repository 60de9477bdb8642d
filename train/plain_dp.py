"""Data parallelism without ZeRO (``deepspeed.zero_stage=0``): the gradient clip and the skip of a non-finite update
that DeepSpeed's ZeRO optimizer makes for stages 1 and 2.

Under stage 0 DeepSpeed steps a plain torch optimizer: it can clip, but records no gradient norm and applies an update
whose gradients are not finite. ``clip_or_skip`` runs after a step's last backward, whose gradients DeepSpeed has
already all-reduced (so every rank computes the same norm and decides alike), and before ``engine.step()``;
``before_step`` also tells DeepSpeed's engine of a dropped update the way its own mixed-precision optimizers do (an
``overflow`` attribute on the optimizer), so the engine treats it as it treats ZeRO's: the learning-rate schedule does
not advance and ``engine.was_step_applied()`` is False.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def clip_or_skip(params: Iterable[nn.Parameter], max_norm: float) -> tuple[torch.Tensor, bool]:
    """Clip the gradients of ``params`` to total 2-norm ``max_norm`` (0: no clip); returns (the norm before
    clipping, whether the update goes ahead).

    When the norm is not finite every gradient is dropped (``grad = None``): a torch optimizer then leaves each
    parameter and its state as they were, as ZeRO does with such a step. Reads one scalar back to the host."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if not bool(torch.isfinite(norm)):
        for p in params:
            p.grad = None
        return norm, False
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm, True


def before_step(engine, max_norm: float) -> torch.Tensor:
    """``clip_or_skip`` on ``engine``'s module, the outcome set as ``engine.optimizer.overflow``; returns the norm."""
    norm, applied = clip_or_skip(engine.module.parameters(), max_norm)
    engine.optimizer.overflow = not applied
    return norm

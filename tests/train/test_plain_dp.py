"""train.plain_dp: the clip and the skip without ZeRO, against float64 sums and a torch optimizer's own state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pure_reasoner.train.plain_dp import clip_or_skip


def _params(seed: int, scale: float) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (5,), (3, 2, 4)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


@pytest.mark.parametrize("scale, max_norm", [(10.0, 1.0), (0.01, 1.0), (10.0, 0.0)])
def test_clip_matches_float64_norm(scale, max_norm):
    params = _params(0, scale)
    grads64 = [p.grad.double().clone() for p in params]
    norm64 = math.sqrt(sum(float((g * g).sum()) for g in grads64))
    norm, applied = clip_or_skip(params, max_norm)
    assert applied
    assert float(norm) == pytest.approx(norm64, rel=1e-6)
    factor = min(1.0, max_norm / (norm64 + 1e-6)) if max_norm > 0 else 1.0
    for p, g in zip(params, grads64, strict=True):
        torch.testing.assert_close(p.grad.double(), g * factor, rtol=1e-6, atol=1e-12)
    clipped = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    assert clipped <= (max_norm if max_norm > 0 else norm64) * (1 + 1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_leave_weights_and_optimizer_state(bad):
    params = _params(1, 1.0)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    opt.step()  # some optimizer state to keep
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[2] = bad
    norm, applied = clip_or_skip(params, 1.0)
    assert not applied and not math.isfinite(float(norm))
    assert all(p.grad is None for p in params)
    opt.step()
    for p, b, s in zip(params, before, state, strict=True):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k

"""The layer under torch.compile, on each implementation that runs here: same output and gradients."""

import pytest
import torch
from kernel_inputs import DEVICE

from pure_reasoner.moe import KnowledgeConfig, MoEConfig, PureReasonerMoE


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_layer_compiles_and_matches_eager(impl):
    cfg = MoEConfig(
        d_model=32,
        reasoning_width=48,
        knowledge=KnowledgeConfig(num_experts=4, expert_width=48, top_k=2, consult_rate=0.5, impl=impl),
    )
    layer = PureReasonerMoE(cfg).to(DEVICE)
    x = torch.randn(2, 8, 32, device=DEVICE)
    compiled = torch.compile(layer, backend="aot_eager")
    y, stats = compiled(x)
    y_eager, _ = layer(x)
    torch.testing.assert_close(y, y_eager)
    assert int(stats.expert_load_E.sum()) > 0  # the knowledge path ran
    params = [p for _, p in sorted(layer.named_parameters())]
    dy = torch.randn_like(y)
    grads, grads_eager = torch.autograd.grad(y, params, dy), torch.autograd.grad(y_eager, params, dy)
    for (name, _), g, g_eager in zip(sorted(layer.named_parameters()), grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager, msg=name)

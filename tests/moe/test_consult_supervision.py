"""Supervised consult: consult targets train the gate's consult logit by BCE (knowledge.consult_loss_coef), a
training objective (train.objectives.consult_supervision) on the consult logits the layers' stats expose."""

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.moe import KnowledgeConfig, MoEConfig, PureReasonerMoE
from pure_reasoner.moe.router import KnowledgeRouter
from pure_reasoner.train.objectives import consult_loss, consult_supervision


def test_consult_loss_is_bce_of_the_consult_logit():
    torch.manual_seed(0)
    router = KnowledgeRouter(16, KnowledgeConfig(num_experts=4, expert_width=8, consult_rate=0.5))
    x_TD = torch.randn(32, 16)
    target_T = torch.rand(32) < 0.3
    routing = router(x_TD)
    loss = consult_loss(routing.consult_logit_T, target_T)
    w_D, b = router.consult_proj.weight[0].detach(), float(router.consult_proj.bias)
    logit_T = x_TD @ w_D + b
    expected = -(target_T * F.logsigmoid(logit_T) + ~target_T * F.logsigmoid(-logit_T)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert router.consult_proj.weight.grad.abs().sum() > 0


def test_consult_targets_need_the_gate():
    with pytest.raises(ValueError, match="consult_loss_coef"):
        KnowledgeConfig(mechanism="null", consult_loss_coef=1.0)
    router = KnowledgeRouter(16, KnowledgeConfig(num_experts=4, expert_width=8, mechanism="null"))
    with pytest.raises(ValueError, match="gate"):
        consult_loss(router(torch.randn(8, 16)).consult_logit_T, torch.zeros(8, dtype=torch.bool))
    layer = PureReasonerMoE(MoEConfig(d_model=16, reasoning_width=16, knowledge=router.cfg))
    with pytest.raises(ValueError, match="gate"):
        consult_supervision([layer(torch.randn(8, 16))[1]], torch.zeros(8, dtype=torch.bool), 1.0)


def test_supervised_gate_learns_which_tokens_consult():
    """Targets that depend on the input (first feature > 0.5, ~30% of tokens): after training on the aux loss
    alone, the layer consults on those tokens and not on the others, at the controller's rate."""
    torch.manual_seed(0)
    kcfg = KnowledgeConfig(num_experts=4, expert_width=8, consult_rate=0.3, consult_loss_coef=1.0)
    layer = PureReasonerMoE(MoEConfig(d_model=16, reasoning_width=16, knowledge=kcfg))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(200):
        x_TD = torch.randn(256, 16)
        target_T = x_TD[:, 0] > 0.5
        _, stats = layer(x_TD)
        opt.zero_grad()
        (stats.aux_loss + consult_supervision([stats], target_T, kcfg.consult_loss_coef)).backward()
        opt.step()
        layer.update_controller(stats)
    layer.eval()
    x_TD = torch.randn(4096, 16)
    target_T = x_TD[:, 0] > 0.5
    ids_TK = layer.router(x_TD).expert_ids_TK
    consulted_T = (ids_TK >= 0).any(1)
    agreement = (consulted_T == target_T).float().mean()
    assert agreement > 0.9, float(agreement)
    with pytest.raises(ValueError, match="consult_target"):
        consult_supervision([layer(x_TD)[1]], target_T[:10], kcfg.consult_loss_coef)

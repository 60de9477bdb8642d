"""DeepSpeed's Residual MoE as a drop-in FFN for ``moe.model.Block`` (the ``residual_moe`` baseline).

Shape legend: T tokens, D model dim, E experts.

``deepspeed.moe.layer.MoE(use_residual=True)`` (PR-MoE, Rajbhandari et al. 2022) computes
``y = c0 * moe(x) + c1 * mlp(x)`` with ``(c0, c1) = softmax(Linear(x))``. Its experts and its residual
MLP are our SwiGLU of ``expert_width``. The wrapper returns ``(y, MoEStats)`` like PureReasonerMoE so
the model, the logging and the FLOPs accountant treat it the same way.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from moe import MoEConfig, MoEStats
from moe.experts import SwiGLU


class DeepSpeedResidualFFN(nn.Module):
    """Residual MoE FFN with PureReasonerMoE's interface (``forward -> (y, MoEStats)``, ``update_controller``).

    Dropless (``drop_tokens=False``: DeepSpeed sizes each expert's capacity to its busiest expert) and
    without random token selection, so it is deterministic. Needs ``torch.distributed`` initialised
    (DeepSpeed's gate all-reduces the capacity over the expert-parallel group).
    """

    def __init__(self, cfg: MoEConfig, ep_size: int = 1):
        super().__init__()
        kcfg = cfg.knowledge
        self.cfg = cfg
        self.moe = MoE(
            cfg.d_model,
            SwiGLU(cfg.d_model, kcfg.expert_width),
            num_experts=kcfg.num_experts,
            ep_size=ep_size,
            k=kcfg.top_k,
            use_residual=True,
            drop_tokens=False,
            use_rts=False,
        )
        for name, param in self.moe.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=0.02)

    def forward(self, x: torch.Tensor, knowledge_off: bool = False, reasoning_off: bool = False):
        """x: [..., D] -> (y [..., D], MoEStats). The ablation switches have no meaning here."""
        if knowledge_off or reasoning_off:
            raise ValueError("the residual_moe baseline has no knowledge_off / reasoning_off ablations")
        x_TD = x.reshape(-1, x.shape[-1])
        y_TD, l_aux, counts_E = self.moe(x_TD)
        num_tokens = x_TD.shape[0]
        zero = l_aux.new_zeros(())
        stats = MoEStats(
            aux_loss=self.cfg.knowledge.balance_loss_coef * l_aux,
            balance_loss=l_aux.detach(),
            z_loss=zero,
            expert_load_E=counts_E.to(torch.float32),
            consulting_tokens=torch.tensor(float(num_tokens)),
            num_tokens=num_tokens,
            num_slots=num_tokens * self.cfg.knowledge.top_k,
        )
        return y_TD.view_as(x), stats

    def update_controller(self, stats: MoEStats) -> None:
        """DeepSpeed's gate has no selection biases to steer: nothing to update."""

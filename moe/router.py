"""The knowledge router: decides per token whether to consult knowledge and, if so, which experts.

Shape legend: T tokens, D model dim, E real experts, N null experts, K top-k slots.

The router runs in fp32. Two selection-only biases live in buffers and never receive gradients:
``expert_bias_E`` balances load among real experts (DeepSeek-V3's aux-loss-free balancing) and
``consult_bias`` steers the realized consult rate toward its target. Both change which experts are
*selected*, never the gate values, and both are updated by ``update_biases`` outside autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import NOT_CONSULTED
from moe.config import KnowledgeConfig


class Routing(NamedTuple):
    """What the router decided for T tokens.

    expert_ids_TK: int64 expert per slot, ``NOT_CONSULTED`` (-1) for idle slots.
    gates_TK: fp32 gate per slot, 0 on idle slots.
    balance_loss: 0-d, Switch-style load-balancing loss over consulting tokens.
    z_loss: 0-d, mean squared log-sum-exp of the router logits.
    """

    expert_ids_TK: torch.Tensor
    gates_TK: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


def _masked_mean(values_TX: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Mean of rows where mask is set, with no host sync (0 when the mask is empty)."""
    weights_T = mask_T.to(values_TX.dtype)
    return (values_TX * weights_T.unsqueeze(1)).sum(0) / weights_T.sum().clamp(min=1.0)


class KnowledgeRouter(nn.Module):
    """Token-choice router with a consult decision (mechanisms: see ``KnowledgeConfig``)."""

    def __init__(self, d_model: int, cfg: KnowledgeConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(d_model, cfg.num_router_outputs, bias=False)
        self.consult_proj = nn.Linear(d_model, 1) if cfg.mechanism == "gate" else None
        self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))
        self.register_buffer("consult_bias", torch.zeros(()))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Route T tokens.

        Args:
            x_TD: [T, D] tokens (any float dtype; routing runs in fp32).

        Returns:
            Routing for the T tokens.
        """
        cfg = self.cfg
        x_TD = x_TD.float()
        logits_TL = F.linear(x_TD, self.proj.weight.float())
        real_logits_TE = logits_TL[:, : cfg.num_experts]
        select_TE = real_logits_TE.detach() + self.expert_bias_E
        if cfg.mechanism == "null":
            # The consult bias makes nulls more (positive) or less (negative) attractive.
            null_select_TN = logits_TL[:, cfg.num_experts :].detach() + self.consult_bias
            _, ids_TK = torch.cat([select_TE, null_select_TN], 1).topk(cfg.top_k, dim=1)
            probs_TK = F.softmax(logits_TL, dim=1).gather(1, ids_TK)
            real_TK = ids_TK < cfg.num_experts
        else:
            _, ids_TK = select_TE.topk(cfg.top_k, dim=1)
            probs_TK = F.softmax(real_logits_TE, dim=1).gather(1, ids_TK)
            real_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        gates_TK = probs_TK / probs_TK.sum(1, keepdim=True) if cfg.normalize_gates else probs_TK
        if cfg.mechanism == "gate":
            consult_logit_T = F.linear(x_TD, self.consult_proj.weight.float(), self.consult_proj.bias.float())[:, 0]
            consult_T = (consult_logit_T.detach() + self.consult_bias) > 0
            gates_TK = gates_TK * torch.sigmoid(consult_logit_T).unsqueeze(1)
            real_TK = real_TK & consult_T.unsqueeze(1)
        ids_TK = torch.where(real_TK, ids_TK, NOT_CONSULTED)
        gates_TK = torch.where(real_TK, gates_TK, 0.0)
        return Routing(
            expert_ids_TK=ids_TK,
            gates_TK=gates_TK,
            balance_loss=self._balance_loss(real_logits_TE, ids_TK, real_TK.any(1)),
            z_loss=torch.logsumexp(logits_TL, dim=1).square().mean(),
        )

    def _balance_loss(self, real_logits_TE, ids_TK, consult_T) -> torch.Tensor:
        """Switch Transformer's E * sum_e f_e * P_e, over the tokens that consult.

        f_e: share of routed slots that went to expert e; P_e: mean router probability of e.
        """
        num_experts = self.cfg.num_experts
        load_E = expert_load(ids_TK, num_experts)
        share_E = load_E / load_E.sum().clamp(min=1.0)
        prob_E = _masked_mean(F.softmax(real_logits_TE, dim=1), consult_T)
        return num_experts * (share_E * prob_E).sum()

    @torch.no_grad()
    def update_biases(self, load_E: torch.Tensor, num_slots: torch.Tensor | float) -> None:
        """Nudge the selection-only biases from one step's (already all-reduced) routing counts.

        Args:
            load_E: [E] routed slots per expert.
            num_slots: total slots T*K those counts were taken over.
        """
        cfg = self.cfg
        load_E = load_E.to(self.expert_bias_E)
        if cfg.mechanism != "always":
            rate = load_E.sum() / num_slots
            # Relative error, clipped: the same step size works for targets of 1/32 and 1/2.
            error = ((cfg.consult_rate - rate) / max(cfg.consult_rate, 1e-3)).clamp(-1.0, 1.0)
            sign = 1.0 if cfg.mechanism == "gate" else -1.0  # null: a higher bias means fewer consults
            self.consult_bias += sign * cfg.controller_step * error
        # sign() of an all-zero load is 0: an idle step leaves the balance alone, with no host check.
        self.expert_bias_E += cfg.balance_step * torch.sign(load_E.mean() - load_E)


def expert_load(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fp32 count of slots routed to each expert (idle slots ignored). No host sync."""
    ids_S = expert_ids_TK.reshape(-1)
    load_E1 = torch.zeros(num_experts + 1, device=ids_S.device)
    load_E1.scatter_add_(0, torch.where(ids_S < 0, num_experts, ids_S), torch.ones_like(ids_S, dtype=torch.float32))
    return load_E1[:num_experts]

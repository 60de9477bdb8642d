"""The knowledge router: decides per token whether to consult knowledge and, if so, which experts.

Shape legend: T tokens, D model dim, E real experts, N null experts, K top-k slots.

The router runs in fp32. Selection-only state lives in buffers and never receives gradients; it
changes which experts are *selected*, never the gate values, and ``update_biases`` updates it
outside autograd:
- ``expert_bias_E`` balances load among real experts (DeepSeek-V3's aux-loss-free balancing);
- the consult *cut*: a token (``gate``: its consult logit) or a slot (``null``: its score minus the
  best null's) consults when its margin exceeds the cut.

Consult-rate controller. In training the cut is this batch's margin quantile at the target rate
(``consult_threshold``) plus a small integral correction (``consult_correction``, for what the
quantile misses: the ``null`` margin is an approximation); in eval it is the running average of
those cuts (``consult_cut``), as BatchNorm uses batch statistics in training and running ones in
eval. Why not a plain feedback bias: with AdamW the consult logits of a learned gate shift by about
lr * |x|_1 per step (0.6 at lr 3e-3, D=256) while they spread by ~0.01 across tokens, so a bias that
lags one step flips a layer between consulting 0% and 99% (seen in training). The batch quantile is
one scalar over thousands of tokens: it tells a token almost nothing about the others.
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
    consult_threshold: 0-d, the consult-margin quantile that hits the target rate on this batch
        (NaN for mechanism ``always``), detached.
    consult_loss: 0-d, mean BCE of the consult logits against the given consult targets (0 without them).
    """

    expert_ids_TK: torch.Tensor
    gates_TK: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    consult_threshold: torch.Tensor
    consult_loss: torch.Tensor


def masked_mean(values_TX: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
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
        self.register_buffer("consult_cut", torch.zeros(()))
        self.register_buffer("consult_correction", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def forward(self, x_TD: torch.Tensor, consult_target_T: torch.Tensor | None = None) -> Routing:
        """Route T tokens.

        Args:
            x_TD: [T, D] tokens (any float dtype; routing runs in fp32).
            consult_target_T: None or [T] bool, whether each token should consult (``gate`` only): trains the
                consult logit by BCE (``Routing.consult_loss``); the routing itself is unchanged.

        Returns:
            Routing for the T tokens.
        """
        cfg = self.cfg
        x_TD = x_TD.float()
        logits_TL = F.linear(x_TD, self.proj.weight.float())
        real_logits_TE = logits_TL[:, : cfg.num_experts]
        select_TE = real_logits_TE.detach() + self.expert_bias_E
        null_logits_TN = logits_TL[:, cfg.num_experts :].detach()
        consult_logit_T, margin = None, None
        if cfg.mechanism == "gate":
            consult_logit_T = F.linear(x_TD, self.consult_proj.weight.float(), self.consult_proj.bias.float())[:, 0]
            margin = consult_logit_T.detach()
        elif cfg.mechanism == "null":
            # A real slot wins (about) when its score beats the best null raised by the cut.
            margin = select_TE.topk(cfg.top_k, dim=1).values - null_logits_TN.max(1, keepdim=True).values
        threshold = logits_TL.new_tensor(float("nan")) if margin is None else self._threshold(margin)
        cut = threshold + self.consult_correction if self.training else self.consult_cut

        if cfg.mechanism == "null":
            _, ids_TK = torch.cat([select_TE, null_logits_TN + cut], 1).topk(cfg.top_k, dim=1)
            probs_TK = F.softmax(logits_TL, dim=1).gather(1, ids_TK)
            real_TK = ids_TK < cfg.num_experts
        else:
            _, ids_TK = select_TE.topk(cfg.top_k, dim=1)
            probs_TK = F.softmax(real_logits_TE, dim=1).gather(1, ids_TK)
            real_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        gates_TK = probs_TK / probs_TK.sum(1, keepdim=True) if cfg.normalize_gates else probs_TK
        if consult_logit_T is not None:
            gates_TK = gates_TK * torch.sigmoid(consult_logit_T).unsqueeze(1)
            real_TK = real_TK & (margin > cut).unsqueeze(1)
        ids_TK = torch.where(real_TK, ids_TK, NOT_CONSULTED)
        gates_TK = torch.where(real_TK, gates_TK, 0.0)
        consult_loss = x_TD.new_zeros(())
        if consult_target_T is not None:
            if consult_logit_T is None:
                raise ValueError(f"consult targets need mechanism 'gate', got {cfg.mechanism!r}")
            consult_loss = F.binary_cross_entropy_with_logits(consult_logit_T, consult_target_T.float())
        return Routing(
            expert_ids_TK=ids_TK,
            gates_TK=gates_TK,
            balance_loss=self._balance_loss(real_logits_TE, ids_TK, real_TK.any(1)),
            z_loss=torch.logsumexp(logits_TL, dim=1).square().mean(),
            consult_threshold=threshold,
            consult_loss=consult_loss,
        )

    def _threshold(self, margin: torch.Tensor) -> torch.Tensor:
        """The value that a ``consult_rate`` share of the margins exceeds. kthvalue, not quantile:
        no size limit, and k comes from shapes, so nothing is read back from the device."""
        flat = margin.reshape(-1)
        k = min(max(round((1.0 - self.cfg.consult_rate) * flat.numel()), 1), flat.numel())
        return flat.kthvalue(k).values

    def _balance_loss(self, real_logits_TE, ids_TK, consult_T) -> torch.Tensor:
        """Switch Transformer's E * sum_e f_e * P_e, over the tokens that consult.

        f_e: share of routed slots that went to expert e; P_e: mean router probability of e.
        """
        num_experts = self.cfg.num_experts
        load_E = expert_load(ids_TK, num_experts)
        share_E = load_E / load_E.sum().clamp(min=1.0)
        prob_E = masked_mean(F.softmax(real_logits_TE, dim=1), consult_T)
        return num_experts * (share_E * prob_E).sum()

    @torch.no_grad()
    def update_biases(
        self, load_E: torch.Tensor, num_slots: torch.Tensor | float, consult_threshold: torch.Tensor | None = None
    ) -> None:
        """Update the selection-only state from one step's (already all-reduced) routing.

        Args:
            load_E: [E] routed slots per expert.
            num_slots: total slots T*K those counts were taken over.
            consult_threshold: 0-d ``Routing.consult_threshold``, averaged over micro-batches and ranks;
                None (or NaN): the running cut gets the feedback step only.
        """
        cfg = self.cfg
        load_E = load_E.to(self.expert_bias_E)
        if cfg.mechanism != "always":
            rate = load_E.sum() / num_slots
            # Relative error, clipped: the same step size works for targets of 1/32 and 1/2.
            step = cfg.controller_step * ((cfg.consult_rate - rate) / max(cfg.consult_rate, 1e-3)).clamp(-1.0, 1.0)
            self.consult_correction -= step  # too few consults: lower the cut
            if consult_threshold is None or not torch.isfinite(consult_threshold):
                self.consult_cut -= step
            else:
                # Cumulative average at first, then an EMA (BatchNorm's running statistics, same idea).
                self.num_updates += 1
                momentum = max(cfg.cut_momentum, 1.0 / float(self.num_updates))
                target_cut = consult_threshold.to(self.consult_cut) + self.consult_correction
                self.consult_cut.lerp_(target_cut, momentum)
        # sign() of an all-zero load is 0: an idle step leaves the balance alone, with no host check.
        self.expert_bias_E += cfg.balance_step * torch.sign(load_E.mean() - load_E)


def expert_load(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fp32 count of slots routed to each expert (idle slots ignored). No host sync."""
    ids_S = expert_ids_TK.reshape(-1)
    load_E1 = torch.zeros(num_experts + 1, device=ids_S.device)
    load_E1.scatter_add_(0, torch.where(ids_S < 0, num_experts, ids_S), torch.ones_like(ids_S, dtype=torch.float32))
    return load_E1[:num_experts]

"""The knowledge router: decides per token whether to consult knowledge and, if so, which experts.

Shape legend: T tokens, D model dim, E real experts, N null experts, K top-k slots, R reference tokens.

The router runs in fp32, and a token's routing depends on that token and the router's state only (never on
other positions or sequences of the call), in training and in eval alike.

Consult rule. Each token (``gate``: its consult logit) or slot (``null``: its best real score minus the best
null's) has a *consult margin*, and consults when the margin exceeds the layer's ``margin_threshold``. After
each optimizer step the controller (``update_controller``) sets ``margin_threshold`` to the margin that a share
``consult_rate * exp(log_rate_offset)`` of the reference inputs ``reference_x_RD`` exceeds under the *new*
weights; ``log_rate_offset`` is an integral feedback term on the realized rate (acting on the log-rate, so its
step means the same whatever the margins' scale) for what the quantile misses: the ``null`` margin is an
approximation and the inputs drift as the layers below learn.

Why re-take the quantile under the new weights: with AdamW a learned consult gate's logits move by about
lr * |x|_1 per step (0.6 at lr 3e-3, D=256) while they spread by ~0.01 across tokens, so a threshold from the
previous step's weights would flip a layer between consulting 0% and 99%. Why a short ring of reference
inputs (R = 2,048, one or two steps of the main job): the inputs drift too, and a ring of 8 steps let a
layer's rate sit 33% above target for 20 steps. R also sets the precision that eval keeps: at rate 1/8 a
quantile over 2,048 tokens is off by ~6% (1 sigma), over 256 by ~18%.

``expert_bias_E`` balances load among real experts (DeepSeek-V3's aux-loss-free balancing). The threshold and
the bias change which experts are *selected*, never the gate values, and receive no gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.moe.config import KnowledgeConfig


class Routing(NamedTuple):
    """What the router decided for T tokens.

    expert_ids_TK: int64 expert per slot, ``NOT_CONSULTED`` (-1) for idle slots.
    gates_TK: fp32 gate per slot, 0 on idle slots.
    balance_loss: 0-d, Switch-style load-balancing loss over consulting tokens.
    z_loss: 0-d, mean squared log-sum-exp of the router logits.
    consult_logit_T: [T] fp32 consult logits (``gate`` only, else None), with gradient: what a supervised
        consult loss trains.
    """

    expert_ids_TK: torch.Tensor
    gates_TK: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    consult_logit_T: torch.Tensor | None


def masked_mean(values_TX: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Mean of rows where mask is set, with no host sync (0 when the mask is empty)."""
    weights_T = mask_T.to(values_TX.dtype)
    return (values_TX * weights_T.unsqueeze(1)).sum(0) / weights_T.sum().clamp(min=1.0)


class KnowledgeRouter(nn.Module):
    """Token-choice router with a per-token consult decision (mechanisms: see ``KnowledgeConfig``)."""

    def __init__(self, d_model: int, cfg: KnowledgeConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(d_model, cfg.num_router_outputs, bias=False)
        self.consult_proj = nn.Linear(d_model, 1) if cfg.mechanism == "gate" else None
        self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))
        self.register_buffer("reference_x_RD", torch.zeros(cfg.reference_tokens, d_model))
        self.register_buffer("reference_next", torch.zeros((), dtype=torch.int64))  # ring position
        self.register_buffer("margin_threshold", torch.zeros(()))
        self.register_buffer("log_rate_offset", torch.zeros(()))
        self._register_load_state_dict_pre_hook(_rename_former_buffers)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Route T tokens, each on its own (see the module docstring).

        Args:
            x_TD: [T, D] tokens (any float dtype; routing runs in fp32).

        Returns:
            Routing for the T tokens.
        """
        cfg = self.cfg
        logits_TL = F.linear(x_TD.float(), self.proj.weight.float())
        real_logits_TE = logits_TL[:, : cfg.num_experts]
        select_TE = real_logits_TE.detach() + self.expert_bias_E
        consult_logit_T = self._consult_logit(x_TD)
        if cfg.mechanism == "null":
            null_threshold_TN = logits_TL[:, cfg.num_experts :].detach() + self.margin_threshold
            _, ids_TK = torch.cat([select_TE, null_threshold_TN], 1).topk(cfg.top_k, dim=1)
            probs_TK = F.softmax(logits_TL, dim=1).gather(1, ids_TK)
            real_TK = ids_TK < cfg.num_experts
        else:
            _, ids_TK = select_TE.topk(cfg.top_k, dim=1)
            probs_TK = F.softmax(real_logits_TE, dim=1).gather(1, ids_TK)
            real_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        gates_TK = probs_TK / probs_TK.sum(1, keepdim=True) if cfg.normalize_gates else probs_TK
        if consult_logit_T is not None:
            gates_TK = gates_TK * torch.sigmoid(consult_logit_T).unsqueeze(1)
            real_TK = real_TK & (consult_logit_T.detach() > self.margin_threshold).unsqueeze(1)
        ids_TK = torch.where(real_TK, ids_TK, NOT_CONSULTED)
        gates_TK = torch.where(real_TK, gates_TK, 0.0)
        return Routing(
            expert_ids_TK=ids_TK,
            gates_TK=gates_TK,
            balance_loss=self._balance_loss(real_logits_TE, ids_TK, real_TK.any(1)),
            z_loss=torch.logsumexp(logits_TL, dim=1).square().mean(),
            consult_logit_T=consult_logit_T,
        )

    def _consult_logit(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """[T] the ``gate`` mechanism's consult logits (fp32, with gradient); None for other mechanisms."""
        if self.consult_proj is None:
            return None
        return F.linear(x_TD.float(), self.consult_proj.weight.float(), self.consult_proj.bias.float())[:, 0]

    @torch.no_grad()
    def consult_margins(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The margins that ``margin_threshold`` is compared with: [T] consult logits (``gate``) or [T, K] per-slot
        margins, each of the top-K biased real scores minus the best null score (``null``; approximate: a real
        slot also competes with the second-best null); None for ``always``."""
        cfg = self.cfg
        if cfg.mechanism == "gate":
            return self._consult_logit(x_TD)
        if cfg.mechanism == "null":
            logits_TL = F.linear(x_TD.float(), self.proj.weight.float())
            select_TE = logits_TL[:, : cfg.num_experts] + self.expert_bias_E
            return select_TE.topk(cfg.top_k, dim=1).values - logits_TL[:, cfg.num_experts :].max(1, keepdim=True).values
        return None

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
    def update_controller(
        self, load_E: torch.Tensor, num_slots: torch.Tensor | float, router_inputs_ND: torch.Tensor | None = None
    ) -> None:
        """Update the selection-only state from one step's (already all-reduced) routing, after the optimizer
        step: the feedback term, the reference sample, the threshold under the current weights, the balance bias.
        Reads nothing back to the host.

        Args:
            load_E: [E] routed slots per expert over the step.
            num_slots: total slots T*K those counts were taken over.
            router_inputs_ND: None, or [N, D] router inputs of the step (``MoEStats.router_inputs_ND``; the same
                on every rank): they replace the oldest rows of the reference ring.
        """
        cfg = self.cfg
        load_E = load_E.to(self.expert_bias_E)
        if cfg.mechanism != "always":
            rate = load_E.sum() / num_slots
            # Relative error, clipped: the same step size works for targets of 1/32 and 1/2.
            step = cfg.controller_step * ((cfg.consult_rate - rate) / max(cfg.consult_rate, 1e-3)).clamp(-1.0, 1.0)
            self.log_rate_offset += step  # too few consults: aim at a higher rate
            # Bounded (a factor of 20 either way), so a layer whose gate cannot reach the target winds up no further.
            self.log_rate_offset.clamp_(-3.0, 3.0)
            if router_inputs_ND is not None:
                self.add_reference(router_inputs_ND)
            self.refresh_threshold()
        # sign() of an all-zero load is 0: an idle step leaves the balance alone, with no host check.
        self.expert_bias_E += cfg.balance_step * torch.sign(load_E.mean() - load_E)

    @torch.no_grad()
    def add_reference(self, router_inputs_ND: torch.Tensor) -> None:
        """Write ``router_inputs_ND`` ([N, D]; at most R rows spread evenly over it) over the oldest rows of the
        reference ring. Index arithmetic on device: no host sync."""
        num_ref = self.cfg.reference_tokens
        rows_ND = spread_rows(router_inputs_ND, min(router_inputs_ND.shape[0], num_ref)).to(self.reference_x_RD)
        slots_N = (self.reference_next + torch.arange(rows_ND.shape[0], device=rows_ND.device)) % num_ref
        self.reference_x_RD.index_copy_(0, slots_N, rows_ND)
        self.reference_next.copy_((self.reference_next + rows_ND.shape[0]) % num_ref)

    @torch.no_grad()
    def refresh_threshold(self) -> None:
        """``margin_threshold`` = the margin that a ``consult_rate * exp(log_rate_offset)`` share of the reference
        sample's margins exceeds under the current weights (linear interpolation between order statistics).
        The index is computed on device, so nothing is read back to the host."""
        margins = self.consult_margins(self.reference_x_RD)
        if margins is None:
            return
        sorted_M = margins.reshape(-1).sort().values
        rate = (self.cfg.consult_rate * self.log_rate_offset.exp()).clamp(0.0, 1.0)
        position = (1.0 - rate) * (sorted_M.numel() - 1)
        low_1 = position.floor().long().view(1)
        high_1 = (low_1 + 1).clamp(max=sorted_M.numel() - 1)
        threshold_1 = torch.lerp(sorted_M.index_select(0, low_1), sorted_M.index_select(0, high_1), position - low_1)
        self.margin_threshold.copy_(threshold_1[0])

    @torch.no_grad()
    def reset_controller(self) -> None:
        """Fresh controller state for freshly initialised weights: unit-RMS Gaussian reference inputs (what an
        RMSNorm at init hands the router), no rate offset, the threshold they imply, no balance bias."""
        self.reference_x_RD.normal_()
        self.reference_next.zero_()
        self.log_rate_offset.zero_()
        self.expert_bias_E.zero_()
        self.refresh_threshold()


# Buffer names of checkpoints written before the controller's state was renamed, and their names now.
FORMER_BUFFER_NAMES = {"consult_cut": "margin_threshold", "rate_correction": "log_rate_offset"}


def _rename_former_buffers(state_dict: dict, prefix: str, *_args) -> None:
    """A load_state_dict pre-hook: an older checkpoint's controller buffers load under their current names."""
    for old, new in FORMER_BUFFER_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def spread_rows(x_ND: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows, D]: rows ``floor(i * N / num_rows)`` of x_ND, spread evenly (repeated when num_rows > N).
    The indices come from shapes only: no host sync."""
    rows_M = torch.arange(num_rows, device=x_ND.device) * x_ND.shape[0] // num_rows
    return x_ND[rows_M]


def expert_load(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fp32 count of slots routed to each expert (idle slots ignored). No host sync."""
    ids_S = expert_ids_TK.reshape(-1)
    load_E1 = torch.zeros(num_experts + 1, device=ids_S.device)
    load_E1.scatter_add_(0, torch.where(ids_S < 0, num_experts, ids_S), torch.ones_like(ids_S, dtype=torch.float32))
    return load_E1[:num_experts]


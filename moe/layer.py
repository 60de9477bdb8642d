"""PureReasonerMoE: an always-on reasoning expert plus occasionally-consulted knowledge experts.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, F_r reasoning width,
F_e knowledge-expert width, E knowledge experts, K top-k slots (k: one of them).

    y_TD = reasoning(x_TD) + sum over consulted slots k of gates_TK[:, k] * expert_{ids_TK[:, k]}(x_TD)

Every token pays for the reasoning expert; a token pays for a knowledge expert only when it consults
it. Statistics and auxiliary losses are returned from ``forward``, never kept in module state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pure_reasoner.moe.config import MoEConfig
from pure_reasoner.moe.experts import GroupedExperts, SwiGLU, overflow_rows, saved_row_bound
from pure_reasoner.moe.router import KnowledgeRouter, expert_load, spread_rows


class MoEStats(NamedTuple):
    """What one layer did on one forward pass. Tensors stay on device; nothing is read back.

    aux_loss: 0-d, weighted balance + z-loss, to add to the training loss.
    balance_loss, z_loss: 0-d, unweighted.
    expert_load_E: [E] routed slots per knowledge expert (the routed rows of the knowledge path).
    consulting_tokens: 0-d, tokens that consulted at least one expert.
    num_tokens: T.
    num_slots: T*K.
    router_inputs_ND: [N, D] fp32 sample of the router's inputs (N = min(T, reference_tokens), rows spread
        evenly over the call), detached: the consult controller's next reference sample; None when the
        router did not run. Concatenate it over ranks so every rank applies the same update.
    overflow_rows: 0-d, routed slots past the knowledge path's saved-activation bound (recomputed in the
        backward, not dropped; ``moe.experts.saved_row_bound``); None when the router did not run.
    consult_logit_T: [T] fp32 consult logits with gradient (mechanism ``gate``; None otherwise or when the router
        did not run): what a supervised consult loss trains (``train.objectives.consult_supervision``).
    """

    aux_loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load_E: torch.Tensor
    consulting_tokens: torch.Tensor
    num_tokens: int
    num_slots: int
    router_inputs_ND: torch.Tensor | None = None
    overflow_rows: torch.Tensor | None = None
    consult_logit_T: torch.Tensor | None = None

    @property
    def consult_rate(self) -> torch.Tensor:
        """Share of tokens that consulted knowledge."""
        return self.consulting_tokens / max(self.num_tokens, 1)

    @property
    def slot_rate(self) -> torch.Tensor:
        """Share of the T*K slots that went to a real expert (what the knowledge path costs)."""
        return self.expert_load_E.sum() / max(self.num_slots, 1)


class PureReasonerMoE(nn.Module):
    """The layer. See the module docstring; config in ``moe.MoEConfig``."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        kcfg = cfg.knowledge
        self.reasoning = SwiGLU(cfg.d_model, cfg.reasoning_width) if cfg.reasoning_width else None
        self.reasoning_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.reasoning_gate else None
        self.router = KnowledgeRouter(cfg.d_model, kcfg)
        self.experts = GroupedExperts(cfg.d_model, kcfg.expert_width, kcfg.num_experts, kcfg.impl,
                                      kcfg.saved_row_share, kcfg.saved_rows_min, kcfg.deterministic,
                                      tf32=kcfg.tf32)
        self.init_weights()

    def init_weights(self, std: float = 0.02, out_std: float = 0.02) -> None:
        """Normal(0, std) inputs, Normal(0, out_std) output projections; zero biases."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                is_out = name.endswith("w2.weight") or name.endswith("w2_EFD")
                nn.init.normal_(param, std=out_std if is_out else std)
        self.router.reset_controller()

    def forward(self, x: torch.Tensor, knowledge_off: bool = False) -> tuple[torch.Tensor, MoEStats]:
        """Apply the layer. Research interventions (reasoning off, mean ablations, gradient routing) are applied
        from outside by ``moe.interventions``.

        Args:
            x: [..., D] tokens (e.g. [B, S, D]).
            knowledge_off: no token consults (the router and the knowledge experts do not run).

        Returns:
            y: same shape as x; stats: MoEStats of this call.
        """
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"x must have last dim d_model={self.cfg.d_model}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, x.shape[-1])
        y_TD = self._reasoning(x_TD)
        if knowledge_off:
            return y_TD.view_as(x), self._idle_stats(x_TD)
        routing = self.router(x_TD)
        knowledge_TD = self.experts(x_TD, routing.expert_ids_TK, routing.gates_TK)
        y_TD = y_TD + knowledge_TD
        kcfg = self.cfg.knowledge
        aux_loss = kcfg.balance_loss_coef * routing.balance_loss + kcfg.z_loss_coef * routing.z_loss
        stats = MoEStats(
            aux_loss=aux_loss,
            balance_loss=routing.balance_loss,
            z_loss=routing.z_loss,
            expert_load_E=expert_load(routing.expert_ids_TK, kcfg.num_experts),
            consulting_tokens=(routing.expert_ids_TK >= 0).any(1).sum(),
            num_tokens=x_TD.shape[0],
            num_slots=routing.expert_ids_TK.numel(),
            router_inputs_ND=self._router_sample(x_TD),
            overflow_rows=overflow_rows(
                routing.expert_ids_TK,
                saved_row_bound(routing.expert_ids_TK.numel(), kcfg.saved_row_share, kcfg.saved_rows_min),
            ),
            consult_logit_T=routing.consult_logit_T,
        )
        return y_TD.view_as(x), stats

    def _reasoning(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.reasoning is None:
            return torch.zeros_like(x_TD)
        y_TD = self.reasoning(x_TD)
        if self.reasoning_gate is not None:
            y_TD = torch.sigmoid(self.reasoning_gate(x_TD)) * y_TD
        return y_TD

    def _router_sample(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[N, D] fp32 rows spread evenly over x_TD, N = min(T, reference_tokens); from shapes only (no sync)."""
        return spread_rows(x_TD.detach(), min(x_TD.shape[0], self.cfg.knowledge.reference_tokens)).float()

    def _idle_stats(self, x_TD: torch.Tensor) -> MoEStats:
        zero = x_TD.new_zeros((), dtype=torch.float32)
        num_tokens = x_TD.shape[0]
        return MoEStats(
            aux_loss=zero,
            balance_loss=zero,
            z_loss=zero,
            expert_load_E=x_TD.new_zeros(self.cfg.knowledge.num_experts, dtype=torch.float32),
            consulting_tokens=zero,
            num_tokens=num_tokens,
            num_slots=num_tokens * self.cfg.knowledge.top_k,
        )

    @torch.no_grad()
    def update_controller(self, stats: MoEStats) -> None:
        """Steer the consult rate and expert balance from one step's stats (all-reduce them first
        when training data-parallel, so every rank applies the same update)."""
        self.router.update_controller(stats.expert_load_E, stats.num_slots, stats.router_inputs_ND)

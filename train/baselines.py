"""DeepSpeed's Residual MoE as a drop-in FFN for ``moe.model.Block`` (the ``residual_moe`` baseline).

Shape legend: T tokens, D model dim, E experts.

``deepspeed.moe.layer.MoE(use_residual=True)`` (PR-MoE, Rajbhandari et al. 2022) computes
``y = c0 * moe(x) + c1 * mlp(x)`` with ``(c0, c1) = softmax(Linear(x))``. Its experts and its residual
MLP are our SwiGLU of ``expert_width``. The wrapper returns ``(y, MoEStats)`` like PureReasonerMoE so
the model, the logging and the FLOPs accountant treat it the same way. Its ablations zero one of the two
terms: ``knowledge_off`` drops ``c0 * moe(x)`` (the routed experts); ``moe.interventions.reasoning_off`` zeroes
``mlp(x)``, which it finds as ``reasoning``, so ``c1 * mlp(x)`` drops out.

Exported models (``train.export``) carry ``FFN_FILE`` beside ``config.json``; ``load_pretrained`` rebuilds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from safetensors.torch import load_file
from torch import nn

from pure_reasoner.moe import ModelConfig, MoEConfig, MoEStats, PureReasonerLM
from pure_reasoner.moe.checkpoint import CONFIG, FFN_FILE, WEIGHTS, atomic_write, config_from_dict, save_pretrained
from pure_reasoner.moe.experts import SwiGLU


class DeepSpeedResidualFFN(nn.Module):
    """Residual MoE FFN with PureReasonerMoE's interface (``forward -> (y, MoEStats)``, ``update_controller``).

    Dropless (``drop_tokens=False``: DeepSpeed sizes each expert's capacity to its busiest expert), without
    random token selection and with the plain top-2 (no Gumbel-sampled second expert), so it is deterministic.
    Needs ``torch.distributed`` initialised (DeepSpeed's gate all-reduces the capacity over the expert-parallel
    group).
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
            top2_2nd_expert_sampling=False,  # DeepSpeed's default samples the 2nd expert (Gumbel), even in eval
        )
        for name, param in self.moe.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=0.02)

    def forward(self, x: torch.Tensor, knowledge_off: bool = False):
        """x: [..., D] -> (y [..., D], MoEStats); ``knowledge_off`` drops the routed experts' term."""
        x_TD = x.reshape(-1, x.shape[-1])
        num_tokens = x_TD.shape[0]
        if knowledge_off:
            return self._knowledge_off(x_TD).view_as(x), self._idle_stats(num_tokens)
        y_TD, l_aux, counts_E = self.moe(x_TD)
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

    @property
    def experts(self) -> nn.Module:
        """The routed experts (what ``knowledge_off`` removes), as PureReasonerMoE names them."""
        return self.moe.deepspeed_moe.experts

    @property
    def reasoning(self) -> nn.Module:
        """The residual MLP (what ``moe.interventions.reasoning_off`` zeroes), as PureReasonerMoE names it."""
        return self.moe.mlp

    @torch.no_grad()
    def _knowledge_off(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``MoE.forward``'s mix ``c0 * moe(x) + c1 * mlp(x)`` without the routed experts' term (eval only)."""
        coef_T2 = F.softmax(self.moe.coefficient(x_TD), dim=-1)
        return torch.zeros_like(x_TD) + self.moe.mlp(x_TD) * coef_T2[:, 1:]

    def _idle_stats(self, num_tokens: int) -> MoEStats:
        zero = torch.zeros(())
        return MoEStats(zero, zero, zero, torch.zeros(self.cfg.knowledge.num_experts), zero, num_tokens,
                        num_tokens * self.cfg.knowledge.top_k)

    def update_controller(self, stats: MoEStats) -> None:
        """DeepSpeed's gate has no selection biases to steer: nothing to update."""


def use_residual_ffns(model: PureReasonerLM, cfg: ModelConfig, ep_size: int = 1) -> PureReasonerLM:
    """Replace every MoE block's FFN of ``model`` by a fresh DeepSpeedResidualFFN (needs torch.distributed)."""
    for block in model.blocks:
        if block.is_moe:
            block.ffn = DeepSpeedResidualFFN(cfg.moe_config(), ep_size=ep_size)
    return model


def save_residual_pretrained(model: PureReasonerLM, directory: Path) -> Path:
    """``save_pretrained`` plus ``FFN_FILE``, so ``load_residual_pretrained`` knows to swap the FFNs back in."""
    out = save_pretrained(model, directory)
    atomic_write(out / FFN_FILE, lambda p: Path(p).write_text(json.dumps({"ffn": "deepspeed_residual"})))
    return out


def load_residual_pretrained(directory: Path, map_location: str = "cpu") -> PureReasonerLM:
    """A residual_moe export as a model (joins or creates a one-process group: DeepSpeed's MoE needs one)."""
    from pure_reasoner.train.dist import init_distributed

    init_distributed()
    cfg = config_from_dict(json.loads((directory / CONFIG).read_text()))
    model = use_residual_ffns(PureReasonerLM(cfg), cfg)
    try:
        model.load_state_dict(load_file(directory / WEIGHTS, device=str(map_location)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{directory / WEIGHTS} does not match its residual_moe config: {err}") from err
    return model.to(map_location)

"""Build the model a config asks for: PureReasonerLM, with baseline FFNs or expert parallelism swapped in."""

from __future__ import annotations

import torch

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.train.config import Config


def build_model(cfg: Config, ep_rank: int = 0) -> PureReasonerLM:
    """A freshly initialised model, identical on every rank for the same ``cfg.train.seed``.

    With ``train.ep_size > 1`` each MoE layer keeps only this rank's slice of the knowledge experts
    (``ep_rank`` in the expert-parallel group); see ``train.expert_parallel``.
    """
    torch.manual_seed(cfg.train.seed)
    model = PureReasonerLM(cfg.model)
    if cfg.ffn == "deepspeed_residual":
        from pure_reasoner.train.baselines import use_residual_ffns

        use_residual_ffns(model, cfg.model, cfg.train.ep_size)
    elif cfg.train.ep_size > 1:
        from pure_reasoner.train.expert_parallel import shard_experts

        shard_experts(model, cfg.train.ep_size, ep_rank)
    return model

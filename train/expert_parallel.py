"""Expert parallelism: each rank of an expert-parallel group holds E / ep_size knowledge experts.

Shape legend: T tokens, K slots per token, R routed rows sent, Q rows received, D model dim, F expert
width, E experts, P expert-parallel ranks, E_l = E / P local experts.

The router, the reasoning expert and everything else stay replicated (plain data parallel). In each
MoE layer the routed rows go to the rank that owns their expert by one all-to-all, run through that
rank's experts (the same ``kernels.knowledge_mlp`` seam, dropless), and come back by a second
all-to-all; the gates are applied on the sending rank, so router gradients never leave it. Both
all-to-alls are differentiable (``torch.distributed.nn.functional.all_to_all_single``).

DeepSpeed treats the experts as its own MoE experts: ``ExpertParallelExperts`` is a
``deepspeed.moe.layer.MoE`` (so the engine creates the expert / expert-data-parallel groups of
``deepspeed.utils.groups``, reduces expert gradients over the expert-data-parallel group only and
non-expert gradients over all data-parallel ranks, and gives ZeRO separate MoE parameter groups), and
its parameters are laid out as DeepSpeed's ``deepspeed_moe.experts.deepspeed_experts.<i>`` so the
engine writes one checkpoint file per expert.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from pure_reasoner.kernels import knowledge_mlp
from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.moe.experts import GroupedExperts


class _Expert(nn.Module):
    """One SwiGLU expert in the grouped layout (w1, w3: [D, F]; w2: [F, D])."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.w1_DF = nn.Parameter(torch.empty(d_model, width))
        self.w3_DF = nn.Parameter(torch.empty(d_model, width))
        self.w2_FD = nn.Parameter(torch.empty(width, d_model))


class _LocalExperts(nn.Module):
    """Holds ``experts`` (DeepSpeed's Experts container) where DeepSpeed's MoE keeps its MOELayer."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts

    def _set_ep_group(self, group) -> None:
        self.ep_group = group


class ExpertParallelExperts(MoE):
    """Drop-in for ``GroupedExperts`` holding this rank's slice of the E experts.

    Args:
        source: the full GroupedExperts (identical on every rank, same seed) to take the slice from.
        ep_size: P; ep_rank: this rank's index in its expert-parallel group.
    """

    def __init__(self, source: GroupedExperts, ep_size: int, ep_rank: int):
        nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed gate, our router stays in charge
        num_experts, d_model, width = source.w1_EDF.shape
        self.impl, self.ep_size, self.num_experts = source.impl, ep_size, num_experts
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        local = slice(ep_rank * self.num_local_experts, (ep_rank + 1) * self.num_local_experts)
        experts = Experts(_Expert(d_model, width), self.num_local_experts, self.expert_group_name)
        with torch.no_grad():
            for expert, w1, w3, w2 in zip(
                experts.deepspeed_experts, source.w1_EDF[local], source.w3_EDF[local], source.w2_EFD[local], strict=True
            ):
                expert.w1_DF.copy_(w1), expert.w3_DF.copy_(w3), expert.w2_FD.copy_(w2)
        self.deepspeed_moe = _LocalExperts(experts)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: create (once) and attach the expert-parallel group."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )
        self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        experts = self.deepspeed_moe.experts.deepspeed_experts
        return tuple(torch.stack([getattr(e, name) for e in experts]) for name in ("w1_DF", "w3_DF", "w2_FD"))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
        """Same contract as ``GroupedExperts.forward``: sum over consulted slots of gate * expert(x). [T, D]."""
        group = self.deepspeed_moe.ep_group
        num_slots_per_token = expert_ids_TK.shape[1]
        ids_S = expert_ids_TK.reshape(-1)
        # Routed slots sorted by expert, hence by owning rank (expert e lives on rank e // E_l).
        order_S = torch.argsort(torch.where(ids_S >= 0, ids_S, self.num_experts), stable=True)
        num_routed = int((ids_S >= 0).sum())  # a host read: the all-to-all needs its split sizes
        slot_R = order_S[:num_routed]
        expert_R = ids_S[slot_R]
        owner_R = expert_R // self.num_local_experts
        send_P = torch.bincount(owner_R, minlength=self.ep_size)
        recv_P = torch.empty_like(send_P)
        dist.all_to_all_single(recv_P, send_P, group=group)
        send, recv = send_P.tolist(), recv_P.tolist()
        x_QD = all_to_all_single(
            x_TD.new_empty(sum(recv), x_TD.shape[1]),
            x_TD.index_select(0, slot_R // num_slots_per_token),
            output_split_sizes=recv,
            input_split_sizes=send,
            group=group,
        )
        local_R = expert_R - owner_R * self.num_local_experts
        local_Q = torch.empty(sum(recv), dtype=local_R.dtype, device=local_R.device)
        dist.all_to_all_single(local_Q, local_R, output_split_sizes=recv, input_split_sizes=send, group=group)
        w1_EDF, w3_EDF, w2_EFD = self._stacked()
        ones_Q1 = torch.ones(sum(recv), 1, dtype=torch.float32, device=x_TD.device)
        y_QD = knowledge_mlp(x_QD, local_Q.unsqueeze(1), ones_Q1, w1_EDF, w3_EDF, w2_EFD, impl=self.impl)
        y_RD = all_to_all_single(
            x_TD.new_empty(num_routed, x_TD.shape[1]),
            y_QD,
            output_split_sizes=send,
            input_split_sizes=recv,
            group=group,
        )
        y_RD = y_RD * gates_TK.reshape(-1).index_select(0, slot_R).to(y_RD.dtype).unsqueeze(1)
        return torch.zeros_like(x_TD).index_add(0, slot_R // num_slots_per_token, y_RD)


def shard_experts(model: PureReasonerLM, ep_size: int, ep_rank: int) -> None:
    """Replace every MoE layer's GroupedExperts by this rank's ExpertParallelExperts slice, in place."""
    for layer in model.moe_layers():
        layer.experts = ExpertParallelExperts(layer.experts, ep_size, ep_rank)


_EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w1_DF|w3_DF|w2_FD)$")
_GROUPED = {"w1_DF": "w1_EDF", "w3_DF": "w3_EDF", "w2_FD": "w2_EFD"}


def gather_expert_state(root: Path, tag: str, cfg) -> dict[str, torch.Tensor]:
    """The full PureReasonerLM state dict of an expert-parallel checkpoint, in fp32.

    Non-expert weights come from DeepSpeed's model-states file, each expert from its own
    ``layer_<l>_expert_<e>_...`` file; experts are stacked back into GroupedExperts' [E, ...] tensors.
    (These are the module weights: exact for fp32 runs, bf16-rounded for bf16 runs.)
    """
    from pure_reasoner.train.ds_checkpoint import module_state, safe_torch_load

    ckpt = root / tag
    state = module_state(ckpt)
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for path in sorted(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        with safe_torch_load():
            experts_state = torch.load(path, weights_only=True)
        for key, value in experts_state.items():
            match = _EXPERT_KEY.match(key)
            if match is None:
                raise ValueError(f"{path}: unexpected expert key {key!r}")
            prefix, expert, name = match.groups()
            per_expert.setdefault((prefix, name), {})[int(expert)] = value.float()
    for (prefix, name), experts in per_expert.items():
        if sorted(experts) != list(range(cfg.model.knowledge.num_experts)):
            raise ValueError(
                f"{ckpt}: {prefix} has experts {sorted(experts)}, expected all {cfg.model.knowledge.num_experts}"
            )
        state[f"{prefix}.{_GROUPED[name]}"] = torch.stack([experts[e] for e in range(len(experts))])
    return state

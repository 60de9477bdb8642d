"""The DeepSpeed engine: config dict, optimizer parameter groups, ``deepspeed.initialize``."""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pure_reasoner.train.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config for ``cfg``: AdamW (torch's), linear warmup then cosine, ZeRO 1/2 (with
    ``deepspeed``'s communication settings), fp32 or bf16.

    The cosine ends at ``train.max_steps``, or at ``objective.relocate_at``, where ``restart_schedule`` takes over."""
    t, ds = cfg.train, cfg.deepspeed
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip if ds.zero_stage > 0 else 0.0,  # stage 0: train.plain_dp clips
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
                **({"fused": True} if t.fused_adam else {}),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps if cfg.objective.relocate_at is None else cfg.objective.relocate_at,
                "warmup_num_steps": max(t.warmup_steps, 1),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
            "contiguous_gradients": ds.contiguous_gradients,
            "reduce_scatter": ds.reduce_scatter,
        },
        "bf16": {"enabled": ds.precision == "bf16"},
        **({"communication_data_type": ds.communication_data_type} if ds.communication_data_type else {}),
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and expert stacks), none on norms, biases and 1-D gates.

    Expert-parallel parameters (``allreduce=False``) go to DeepSpeed's MoE groups, whose gradients are
    reduced over the expert-data-parallel group only.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if any(is_moe_param(p) for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_engine(cfg: Config, model: nn.Module, world_size: int):
    """``deepspeed.initialize`` on ``model``, compiled with ``train.compile``. Returns (engine, lr_scheduler)."""
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, world_size),
    )
    if cfg.train.compile:
        # The model's forward, not the module call: DeepSpeed's forward hooks (its throughput timer reads
        # time.time()) would break the graph. engine.module stays the model, its state_dict keys unchanged.
        # Expert parallelism (its all-to-all split sizes are read on the host) and DeepSpeed's MoE gate break
        # the graph, so only our own layer on one expert-parallel rank is held to a single graph.
        model = engine.module
        fullgraph = cfg.ffn == "pure_reasoner" and cfg.train.ep_size == 1
        # moe.interventions (gradient routing, the recall_mean forget pass) are forward hooks on submodules that
        # come and go per micro-batch; by default Dynamo does not guard on submodule hooks, so a compiled forward
        # would run without them. Guarding on them makes it recompile when they change instead.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        model.forward = torch.compile(model.forward, backend="inductor", fullgraph=fullgraph)
    return engine, scheduler


def restart_schedule(engine, cfg: Config, iteration: int = -1) -> None:
    """Replace ``engine``'s learning-rate schedule by the relocation phase's (``objective.relocate_at``): DeepSpeed's
    WarmupCosineLR again, linear warmup from 0 to ``cfg.relocate_lr`` over ``cfg.relocate_warmup_steps``, then cosine
    to ``train.min_lr_ratio`` times it at ``train.max_steps``, counted from ``relocate_at``.

    iteration: -1 at the switch: the schedule starts, and the switch's step runs at its iteration 0 (lr 0), as the
        first step of a fresh run does. A run resumed past the switch passes the iteration its checkpoint restored
        (the engine's schedule's ``last_batch_iteration``); the optimizer's learning rate was restored with it.
    """
    from deepspeed.runtime.lr_schedules import WARMUP_LINEAR_RATE, WarmupCosineLR

    old = engine.lr_scheduler
    groups = old.optimizer.param_groups
    saved_lrs = [g["lr"] for g in groups]
    for g in groups:  # WarmupCosineLR takes its peak from the groups' lr when it is built
        g["lr"] = cfg.relocate_lr
    schedule = WarmupCosineLR(
        old.optimizer,
        total_num_steps=cfg.train.max_steps - cfg.objective.relocate_at,
        warmup_num_steps=max(cfg.relocate_warmup_steps, 1),
        warmup_type=WARMUP_LINEAR_RATE,
        warmup_min_ratio=0.0,
        cos_min_ratio=cfg.train.min_lr_ratio,
        last_batch_iteration=iteration,
    )
    if iteration == -1:
        schedule.step()  # iteration 0: lr 0, like the skipped first iteration of ``train.loop.run``
    else:
        for g, lr in zip(groups, saved_lrs, strict=True):
            g["lr"] = lr
    engine.lr_scheduler = schedule


def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32

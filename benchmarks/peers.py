"""Providers for the layer benchmark: our layer, and what a user would pick instead, on the same shapes.

Shape legend: T tokens, D model dim, F_r reasoning width, F_k knowledge-expert width, E knowledge
experts, K top-k slots, R routed rows (token-expert pairs actually computed).

Each provider is a module, ``call(x_TD) -> y_TD``, and what one forward costs *as executed on this
input*: matmul FLOPs (2 per multiply-add; elementwise ops, softmax and top-k are not counted) and the
bytes of the weights it reads (an expert that receives no row is not read). Peers get equal total
parameters (up to their routers): a shared/residual SwiGLU of width F_r plus E SwiGLU experts of
width F_k, top-K for every token.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.benchmarks.common import ours_engine
from pure_reasoner.kernels import engines
from pure_reasoner.moe import KnowledgeConfig, MoEConfig, PureReasonerMoE
from pure_reasoner.moe.experts import SwiGLU

INIT_STD = 0.02  # every peer is initialised like ours: Normal(0, 0.02), zero biases


@dataclass(frozen=True)
class Shapes:
    """One benchmark workload."""

    name: str
    tokens: int
    d_model: int
    reasoning_width: int
    expert_width: int
    num_experts: int
    top_k: int
    dtype: torch.dtype = torch.float32


@dataclass
class Provider:
    """One thing to time. ``consult_rate``: realized share of tokens that used knowledge experts
    (peers: 1; ``dense``: the rate whose active parameters it matches)."""

    name: str
    consult_rate: float
    module: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]
    fwd_flops: float
    weight_bytes: float
    total_params: int
    routed_rows: int = 0
    touched_experts: int = 0
    bwd_flops: float | None = None  # None: twice the forward (input and weight gradients of every matmul)
    engine: str = ""  # the CPU fp32 GEMM engines it runs (``benchmarks.common.ours_engine``)

    def mode_flops(self, mode: str) -> float:
        """Matmul FLOPs of one call in ``mode`` (fwd, bwd or fwd+bwd)."""
        bwd = 2 * self.fwd_flops if self.bwd_flops is None else self.bwd_flops
        return {"fwd": self.fwd_flops, "bwd": bwd, "fwd+bwd": self.fwd_flops + bwd}[mode]


def swiglu_flops(rows: int, d_model: int, width: int) -> float:
    """Matmul FLOPs of a SwiGLU over ``rows`` rows: three D x width projections."""
    return 2.0 * rows * 3 * d_model * width


def _init_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(std=INIT_STD)
    return module


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _itemsize(shapes: Shapes) -> int:
    return torch.empty((), dtype=shapes.dtype).element_size()


def consult_bias_for_rate(layer: PureReasonerMoE, x_TD: torch.Tensor, rate: float) -> float:
    """The consult bias under which exactly ``round(rate * T)`` tokens of ``x_TD`` consult knowledge.

    Mirrors the ``gate`` router's decision ``consult_logit > margin_threshold`` (cut = -bias), with
    the logit computed as the router does (fp32); the bias sits halfway between two neighbouring logits.
    """
    proj = layer.router.consult_proj
    with torch.no_grad():
        logits_T = F.linear(x_TD.float(), proj.weight.float(), proj.bias.float())[:, 0]
    sorted_T = logits_T.sort(descending=True).values.double()
    num_consult = round(rate * len(sorted_T))
    if num_consult == 0:
        return -float(sorted_T[0]) - 1.0
    if num_consult == len(sorted_T):
        return -float(sorted_T[-1]) + 1.0
    return -float(sorted_T[num_consult - 1] + sorted_T[num_consult]) / 2


def build_ours(shapes: Shapes, impl: str = "torch") -> PureReasonerMoE:
    """Our layer (``gate`` mechanism) on ``shapes``; its consult rate is set per call by ``ours``."""
    kcfg = KnowledgeConfig(
        num_experts=shapes.num_experts, expert_width=shapes.expert_width, top_k=shapes.top_k, mechanism="gate",
        impl=impl,
    )
    layer = PureReasonerMoE(MoEConfig(d_model=shapes.d_model, reasoning_width=shapes.reasoning_width, knowledge=kcfg))
    # The router compares each token's consult logit with its stored cut (set per call by ``ours``).
    return layer.to(shapes.dtype).eval()


def ours(name: str, layer: PureReasonerMoE, shapes: Shapes, x_TD: torch.Tensor, rate: float) -> Provider:
    """Our layer with its consult bias fixed so that a ``rate`` share of ``x_TD``'s tokens consult.

    Providers at different rates share ``layer`` (one copy of the expert weights); each call sets its bias.
    """
    bias = consult_bias_for_rate(layer, x_TD, rate)

    def call(x):
        layer.router.margin_threshold.fill_(-bias)
        return layer(x)[0]

    with torch.no_grad():
        layer.router.margin_threshold.fill_(-bias)
        _, stats = layer(x_TD)
    load_E = stats.expert_load_E
    rows, touched = int(load_E.sum()), int((load_E > 0).sum())
    d, e = shapes.d_model, shapes.num_experts
    router_flops = 2.0 * shapes.tokens * d * (e + 1)  # expert logits and the consult gate
    flops = (swiglu_flops(shapes.tokens, d, shapes.reasoning_width) + router_flops
             + swiglu_flops(rows, d, shapes.expert_width))
    weights = 3 * d * shapes.reasoning_width + d * (e + 1) + 1 + touched * 3 * d * shapes.expert_width
    # With no token consulting, y does not depend on the gates: the router's backward never runs (in training
    # its aux losses would still reach it; the benchmark times y alone).
    bwd_flops = 2 * (flops - router_flops) if rows == 0 else None
    engine = f"linear {engines.current().dense}; experts {ours_engine(d, shapes.expert_width)}"
    return Provider(
        name, float(stats.consult_rate), layer, call, flops, weights * _itemsize(shapes), _num_params(layer),
        rows, touched, bwd_flops, engine=engine,
    )


def oracle(layer: PureReasonerMoE, shapes: Shapes, x_TD: torch.Tensor, rate: float) -> Provider:
    """The dumb per-token loop (``impl="reference"``) on a copy of ``layer``'s weights. Small shapes only."""
    ref = copy.deepcopy(layer)
    ref.experts.impl = "reference"
    return replace(ours("oracle", ref, shapes, x_TD, rate), engine="mkl (per-token loop)")


def reasoning_alone(shapes: Shapes) -> Provider:
    """The reasoning expert by itself: the floor our layer approaches as the consult rate goes to 0."""
    return dense(shapes, 0.0, name="reasoning")


def dense(shapes: Shapes, rate: float, name: str = "dense") -> Provider:
    """A dense SwiGLU with the active parameters of our layer at ``rate`` (width F_r + rate*K*F_k)."""
    width = shapes.reasoning_width + round(rate * shapes.top_k * shapes.expert_width)
    module = _init_(SwiGLU(shapes.d_model, width).to(shapes.dtype))
    weights = 3 * shapes.d_model * width
    return Provider(
        name, rate, module, module, swiglu_flops(shapes.tokens, shapes.d_model, width), weights * _itemsize(shapes),
        weights, engine=f"linear {engines.current().dense}",
    )


def qwen2_moe(shapes: Shapes, x_TD: torch.Tensor, experts_implementation: str = "grouped_mm") -> Provider:
    """HF transformers' ``Qwen2MoeSparseMoeBlock``: gated shared expert (F_r) + top-K of E experts (F_k).

    ``experts_implementation``: ``grouped_mm`` is what transformers picks for a model built with
    ``from_pretrained``/``from_config``; ``eager`` is the block's own per-expert loop.
    """
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(
        hidden_size=shapes.d_model, moe_intermediate_size=shapes.expert_width,
        shared_expert_intermediate_size=shapes.reasoning_width, num_experts=shapes.num_experts,
        num_experts_per_tok=shapes.top_k, norm_topk_prob=True, hidden_act="silu",
        experts_implementation=experts_implementation,
    )
    # transformers leaves the block's tensors uninitialised (and the router at zero, which would send
    # every token to the same experts): initialise them all.
    block = _init_(Qwen2MoeSparseMoeBlock(cfg).to(shapes.dtype))
    num_tokens, d = x_TD.shape

    def call(x):
        return block(x.view(1, num_tokens, d)).view(num_tokens, d)

    with torch.no_grad():
        _, _, ids_TK = block.gate(x_TD)
    touched = int(ids_TK.unique().numel())
    rows = ids_TK.numel()
    flops = (
        swiglu_flops(num_tokens, d, shapes.reasoning_width)
        + 2.0 * num_tokens * d * (shapes.num_experts + 1)  # router + shared-expert gate
        + swiglu_flops(rows, d, shapes.expert_width)
    )
    weights = 3 * d * shapes.reasoning_width + d * (shapes.num_experts + 1) + touched * 3 * d * shapes.expert_width
    name = "qwen2moe" if experts_implementation == "grouped_mm" else f"qwen2moe-{experts_implementation}"
    engine = "linear mkl (nn.Linear); experts " + ("grouped_mm" if experts_implementation == "grouped_mm" else "mkl")
    return Provider(name, 1.0, block, call, flops, weights * _itemsize(shapes), _num_params(block), rows, touched,
                    engine=engine)


def _init_deepspeed_groups() -> None:
    """DeepSpeed's MoE needs its process groups, even for one process: a gloo group of 1 on a HashStore."""
    import deepspeed
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if not torch.cuda.is_available():
        # As train.dist.init_distributed does (benchmarks may not import train/): otherwise DeepSpeed JIT-builds
        # its CPU shared-memory all-reduce op here with g++ (minutes), and a build killed midway leaves a lock
        # file in ~/.cache/torch_extensions that makes every later run wait on it forever.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_moe(shapes: Shapes, x_TD: torch.Tensor) -> Provider:
    """DeepSpeed's residual MoE (``MoE(use_residual=True)``, PR-MoE): dense SwiGLU (F_r) mixed with a
    top-K MoE of E SwiGLU experts (F_k), DeepSpeed's defaults otherwise (capacity factor 1, drops tokens)."""
    _init_deepspeed_groups()
    from deepspeed.moe.layer import MoE

    d = shapes.d_model
    moe = MoE(d, SwiGLU(d, shapes.expert_width), num_experts=shapes.num_experts, k=shapes.top_k, use_residual=True)
    moe.mlp = SwiGLU(d, shapes.reasoning_width)  # the residual MLP is a copy of the expert; give it width F_r
    moe.set_deepspeed_parallelism()
    _init_(moe.to(shapes.dtype))  # DeepSpeed deep-copies one expert E times: identical experts otherwise

    def call(x):
        return moe(x)[0]

    with torch.no_grad():
        gate_out = moe.deepspeed_moe.gate(x_TD, None, True)  # sparse routes: (l_aux, capacity, E, ids, ...)
    capacity = int(gate_out[1])
    # Every expert runs on its full capacity of rows, padded or not; tokens past it are dropped.
    rows = shapes.num_experts * capacity
    num_tokens = x_TD.shape[0]
    flops = (
        swiglu_flops(num_tokens, d, shapes.reasoning_width)
        + 2.0 * num_tokens * d * (shapes.num_experts + 2)  # gate + residual coefficient
        + swiglu_flops(rows, d, shapes.expert_width)
    )
    touched = shapes.num_experts  # capacity rows are computed even for an expert no token chose
    weights = 3 * d * shapes.reasoning_width + d * (shapes.num_experts + 2) + touched * 3 * d * shapes.expert_width
    engine = f"linear {engines.current().dense} (our SwiGLU as its experts and residual MLP)"
    return Provider("deepspeed", 1.0, moe, call, flops, weights * _itemsize(shapes), _num_params(moe), rows, touched,
                    engine=engine)

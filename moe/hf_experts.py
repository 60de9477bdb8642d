"""Our knowledge path (``kernels.knowledge_mlp``) as a transformers experts implementation.

transformers 5 MoE models (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral, ...) decorate their experts module with
``use_experts_implementation``: its ``forward(hidden_states_TD, top_k_index_TK, top_k_weights_TK)`` calls the
function registered in ``ExpertsInterface`` under ``config._experts_implementation``.
``register_experts_implementation`` adds ours, so that on any such model

    import pure_reasoner.moe.hf
    model.set_experts_implementation("pure_reasoner")   # or from_pretrained(..., experts_implementation=...)

runs the routed experts through ``knowledge_mlp``: ``impl="torch"`` on CPU (oneDNN / grouped_mm), ``"triton"`` on
CUDA. ``"pure_reasoner_torch"`` and ``"pure_reasoner_triton"`` pick one explicitly.

Shape legend: T tokens, D model dim, F expert width, E experts, K top-k slots.

The experts' weights stay where transformers keeps them: ``gate_up_proj`` [E, 2F, D] (``[E, D, 2F]`` when the
class is ``is_transposed``) holding gate then up, and ``down_proj`` [E, D, F] (``[E, F, D]``). ``knowledge_mlp``
takes ``w1_EDF, w3_EDF, w2_EFD``: here strided views of those, no copies (the torch path reads views as they are;
the Triton launcher makes them contiguous); the torch path runs gate and up as one GEMM on ``gate_up_proj`` whole.
Gradients flow back into ``gate_up_proj`` and ``down_proj``.
"""

from __future__ import annotations

import torch

from pure_reasoner.kernels import NOT_CONSULTED, knowledge_mlp

IMPLEMENTATIONS = {"pure_reasoner": None, "pure_reasoner_torch": "torch", "pure_reasoner_triton": "triton"}
_SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' SiLU modules


def _check_supported(module: torch.nn.Module) -> None:
    """ValueError naming what an experts module has that ``knowledge_mlp`` (bias-free SwiGLU) does not compute."""
    unsupported = {
        "has_gate=False (no gated activation)": not getattr(module, "has_gate", True),
        "has_bias=True": getattr(module, "has_bias", False),
        "has_post_expert_norm=True": getattr(module, "has_post_expert_norm", False),
        "is_concatenated=False (interleaved gate/up)": not getattr(module, "is_concatenated", True),
        "a custom _apply_gate": _gate_name(module) != "_default_apply_gate",
        f"act_fn {type(module.act_fn).__name__} (SwiGLU needs SiLU)": type(module.act_fn).__name__ not in _SILU,
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise ValueError(f"{type(module).__name__} cannot run as experts implementation 'pure_reasoner': "
                         f"{', '.join(found)}")


def _gate_name(module: torch.nn.Module) -> str:
    """Name of the class's gate function (``use_experts_implementation`` installs ``_default_apply_gate``)."""
    return getattr(getattr(type(module), "_apply_gate", None), "__name__", "")


def expert_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13_ED2F, w1_EDF, w3_EDF, w2_EFD): views of a transformers experts module's ``gate_up_proj`` (whole, then
    its gate and up halves) and ``down_proj``.

    The torch path computes with ``w13_ED2F`` (one fused up-projection GEMM; the gradient goes to it, in
    ``gate_up_proj``'s own layout: ``torch_mlp.wgrad_like``); the Triton path reads the halves, one ``split`` (not
    two slices), so autograd joins their gradients with one ``cat``."""
    width = module.down_proj.shape[-1 if not module.is_transposed else -2]
    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:  # [E, D, 2F], [E, F, D]
        return gate_up, *gate_up.split(width, dim=2), down
    return gate_up.transpose(1, 2), *(h.transpose(1, 2) for h in gate_up.split(width, dim=1)), down.transpose(1, 2)


def experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Sum over each token's top-k experts of weight * SwiGLU expert(x), by ``knowledge_mlp``.

    Args:
        module: a transformers experts module (``use_experts_implementation``): SiLU-gated, no bias.
        hidden_states: [T, D]; top_k_index: [T, K] expert ids (ids >= E, expert parallelism's slots for other
            ranks' experts, count as not consulted); top_k_weights: [T, K].
        impl: ``knowledge_mlp``'s implementation; None: ``triton`` on CUDA, else ``torch``.

    Returns:
        [T, D] in hidden_states' dtype.
    """
    _check_supported(module)
    w13_ED2F, w1_EDF, w3_EDF, w2_EFD = expert_weights(module)
    if impl is None:
        impl = "triton" if hidden_states.device.type == "cuda" else "torch"
    ids_TK = torch.where(top_k_index < module.num_experts, top_k_index, NOT_CONSULTED)
    # As transformers' grouped_mm does: the experts' dtype wins (autocast can hand over fp32 activations).
    x_TD = hidden_states.to(w1_EDF.dtype)
    y_TD = knowledge_mlp(x_TD, ids_TK, top_k_weights, w1_EDF, w3_EDF, w2_EFD, impl=impl,
                         w13_ED2F=w13_ED2F if impl == "torch" else None)
    return y_TD.to(hidden_states.dtype)


def _bound(impl: str | None):
    def forward(module, hidden_states, top_k_index, top_k_weights):
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, impl=impl)

    forward.__name__ = f"pure_reasoner_{impl or 'auto'}_experts_forward"
    return forward


def register_experts_implementation() -> None:
    """Add ``IMPLEMENTATIONS`` to transformers' ``ExpertsInterface`` (global; idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    for name, impl in IMPLEMENTATIONS.items():
        ExpertsInterface.register(name, _bound(impl))

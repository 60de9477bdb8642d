"""Interventions on the knowledge path, applied from outside the forward by hooks on each MoE layer's
knowledge experts (``GroupedExperts``), installed only inside a ``with`` block.

Shape legend: L MoE layers (in module order), B batch, S sequence, T = B*S tokens, D model dim, K top-k slots.

The experts' forward receives ``(x_TD, expert_ids_TK, gates_TK)`` and returns the knowledge path's output
``knowledge_TD``; a token *consulted* a layer when any of its slots holds an expert (``expert_ids_TK >= 0``).

    with record_knowledge_means(model) as record:     # mean output per layer over the consulting tokens
        model(reference_idx_BS)
    with mean_ablation(model, record.means_LD()):     # consulting tokens get that constant instead of their own
        model(idx_BS)

Both take an optional ``mask_BS`` (x's shape without D; settable between calls as ``.mask_BS``): only the
consulting tokens where it is set are recorded / replaced. The constant is fixed: unlike the layer's own
``knowledge_mean`` (a mean over the consulting tokens of the same call, which training's ``recall_mean`` forget
pass uses), the ablated output of a token does not depend on the other tokens of its batch, on padding or on
later positions. Calls of the experts outside these hooks' ``with`` block are untouched; the hooks compose with
``moe.trace.record_knowledge_trace`` and with each other (hooks run in the order their blocks were entered).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.moe.layer import PureReasonerMoE


def knowledge_layers(model: nn.Module) -> list[PureReasonerMoE]:
    """The PureReasonerMoE layers of ``model`` (itself, if it is one) in module order (block order for
    ``PureReasonerLM``). Raises ValueError when there are none (dense models, other MoE baselines)."""
    layers = [m for m in model.modules() if isinstance(m, PureReasonerMoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PureReasonerMoE layers: no knowledge path to intervene on")
    return layers


def _selected(expert_ids_TK: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
    """[T] bool: the tokens that consulted, and are in the mask when there is one."""
    consulted_T = (expert_ids_TK != NOT_CONSULTED).any(1)
    if mask_BS is None:
        return consulted_T
    if mask_BS.dtype != torch.bool or mask_BS.numel() != consulted_T.numel():
        raise ValueError(f"mask_BS must be bool with one entry per token ({consulted_T.numel()}), got "
                         f"{mask_BS.dtype} {tuple(mask_BS.shape)}")
    return consulted_T & mask_BS.reshape(-1).to(consulted_T.device)


@contextmanager
def _expert_hooks(layers: list[PureReasonerMoE], hook_for) -> Iterator[None]:
    """``hook_for(i)`` as a forward hook on layer i's experts for the ``with`` block; removed on exit, even on
    error."""
    handles = [layer.experts.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class KnowledgeMeans:
    """What ``record_knowledge_means`` accumulated: per layer, the sum (fp64) and the number of the knowledge
    outputs of the selected consulting tokens over every call made inside its block.

    mask_BS: None (every consulting token) or the [B, S] bool mask of the next calls' tokens to record.
    """

    def __init__(self, num_layers: int, d_model: int, mask_BS: torch.Tensor | None = None):
        self.sums_LD = torch.zeros(num_layers, d_model, dtype=torch.float64)
        self.counts_L = torch.zeros(num_layers, dtype=torch.int64)
        self.mask_BS = mask_BS

    def add(self, layer: int, knowledge_TD: torch.Tensor, selected_T: torch.Tensor) -> None:
        """Add the rows of ``knowledge_TD`` where ``selected_T`` to layer ``layer``'s sum."""
        if self.sums_LD.device != knowledge_TD.device:  # follow the model's device; no host sync per call
            self.sums_LD, self.counts_L = self.sums_LD.to(knowledge_TD.device), self.counts_L.to(knowledge_TD.device)
        weights_T = selected_T.to(torch.float64)
        self.sums_LD[layer] += weights_T @ knowledge_TD.detach().to(torch.float64)
        self.counts_L[layer] += selected_T.sum()

    def means_LD(self) -> torch.Tensor:
        """[L, D] fp32 mean per layer. Raises ValueError when a layer recorded no token (no mean to apply)."""
        empty = (self.counts_L == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"no consulting token was recorded in MoE layer(s) {empty}: record more tokens")
        return (self.sums_LD / self.counts_L.unsqueeze(1)).float()


@contextmanager
def record_knowledge_means(model: nn.Module, mask_BS: torch.Tensor | None = None) -> Iterator[KnowledgeMeans]:
    """Accumulate, per MoE layer, the knowledge path's output over the consulting tokens of every forward call
    of ``model`` inside the ``with`` block (only where ``mask_BS`` is set, when given).

    Args:
        model: a module holding PureReasonerMoE layers (a PureReasonerLM, or one layer).
        mask_BS: None, or a bool mask over the tokens of the next calls (x's shape without D); change it
            between calls through the yielded object's ``mask_BS``.

    Yields:
        KnowledgeMeans; ``.means_LD()`` gives the [L, D] means. Hooks are removed on exit, even on error.
    """
    layers = knowledge_layers(model)
    record = KnowledgeMeans(len(layers), layers[0].cfg.d_model, mask_BS)

    def hook(index: int):
        def recorded(module, args, knowledge_TD):
            record.add(index, knowledge_TD, _selected(args[1], record.mask_BS))

        return recorded

    with _expert_hooks(layers, hook):
        yield record


class MeanAblation:
    """The state of a ``mean_ablation`` block: ``means_LD`` [L, D] and the mask of the tokens to replace."""

    def __init__(self, means_LD: torch.Tensor, mask_BS: torch.Tensor | None):
        self.means_LD = means_LD
        self.mask_BS = mask_BS


@contextmanager
def mean_ablation(model: nn.Module, means_LD: torch.Tensor, mask_BS: torch.Tensor | None = None
                  ) -> Iterator[MeanAblation]:
    """Inside the ``with`` block, every consulting token of MoE layer l (only where ``mask_BS`` is set, when
    given) receives ``means_LD[l]`` as its knowledge-path output instead of its own; routing, the reasoning
    expert and the other tokens are unchanged. No gradient reaches the experts from a replaced token.

    Args:
        model: a module holding PureReasonerMoE layers (a PureReasonerLM, or one layer).
        means_LD: [L, D] one constant per MoE layer (e.g. ``record_knowledge_means(...).means_LD()``).
        mask_BS: None, or a bool mask over the tokens of the next calls (x's shape without D); change it
            between calls through the yielded object's ``mask_BS``.

    Yields:
        MeanAblation. Hooks are removed on exit, even on error.
    """
    layers = knowledge_layers(model)
    shape = (len(layers), layers[0].cfg.d_model)
    if not isinstance(means_LD, torch.Tensor):
        raise ValueError(f"means_LD must be a tensor, got {type(means_LD).__name__}")
    if tuple(means_LD.shape) != shape or not means_LD.is_floating_point():
        raise ValueError(f"means_LD must be a float tensor of shape {shape} (MoE layers, d_model), got "
                         f"{means_LD.dtype} {tuple(means_LD.shape)}")
    if not bool(torch.isfinite(means_LD).all()):
        raise ValueError("means_LD has non-finite values")
    state = MeanAblation(means_LD, mask_BS)

    def hook(index: int):
        def replaced(module, args, knowledge_TD):
            selected_T = _selected(args[1], state.mask_BS)
            mean_D = state.means_LD[index].to(knowledge_TD)
            return torch.where(selected_T.unsqueeze(1), mean_D, knowledge_TD)

        return replaced

    with _expert_hooks(layers, hook):
        yield state

"""Interventions on the MoE layers, applied from outside the forward by hooks installed only inside a ``with``
block: the layer's own ``forward`` knows nothing of them, and a model outside these blocks carries no hooks.

Shape legend: L MoE layers (in module order), B batch, S sequence, T = B*S tokens, D model dim, K top-k slots.

    with reasoning_off(model):                        # the reasoning experts' outputs are zero
        model(idx_BS)
    with knowledge_mean(model, mask_BS):              # consulting tokens get the call's mean knowledge output
        model(idx_BS)
    with record_knowledge_means(model) as record:     # mean output per layer over the consulting tokens
        model(reference_idx_BS)
    with mean_ablation(model, record.means_LD()):     # consulting tokens get that constant instead of their own
        model(idx_BS)
    with gradient_routing(model, frozen_BS):          # no gradient reaches the reasoning experts from frozen tokens
        model(idx_BS, targets_BS).loss.backward()

The knowledge experts' forward receives ``(x_TD, expert_ids_TK, gates_TK)`` and returns the knowledge path's
output ``knowledge_TD``; a token *consulted* a layer when any of its slots holds an expert
(``expert_ids_TK >= 0``). The reasoning expert's forward maps ``x_TD`` to its output before the optional
reasoning gate (``sigmoid(reasoning_gate(x_TD))`` multiplies it).

Token masks (``mask_BS``, ``frozen_BS``: x's shape without D) belong to the object a block yields and are read by
its hooks only, never kept in module state; the mean interventions let them change between calls (``.mask_BS``).
The constant of ``mean_ablation`` is fixed: unlike ``knowledge_mean`` (a mean over the consulting tokens of the
same call, which training's ``recall_mean`` forget pass uses), the ablated output of a token does not depend on
the other tokens of its batch, on padding or on later positions. The hooks compose with
``moe.trace.record_knowledge_trace`` and with each other (hooks of one module run in the order their blocks were
entered); all are removed on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pure_reasoner.kernels import NOT_CONSULTED
from pure_reasoner.moe.layer import PureReasonerMoE
from pure_reasoner.moe.model import Block
from pure_reasoner.moe.router import masked_mean


def knowledge_layers(model: nn.Module) -> list[PureReasonerMoE]:
    """The PureReasonerMoE layers of ``model`` (itself, if it is one) in module order (block order for
    ``PureReasonerLM``). Raises ValueError when there are none (dense models, other MoE baselines)."""
    layers = [m for m in model.modules() if isinstance(m, PureReasonerMoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PureReasonerMoE layers: no knowledge path to intervene on")
    return layers


def moe_ffns(model: nn.Module) -> list[nn.Module]:
    """The MoE FFNs of ``model`` in module order: its PureReasonerMoE layers (itself, if it is one) and the FFN of
    every MoE ``Block`` (a baseline's FFN too, which names its terms as PureReasonerMoE does: ``reasoning``,
    ``experts``). Empty for a dense model."""
    found = (m.ffn if isinstance(m, Block) else m for m in model.modules()
             if isinstance(m, PureReasonerMoE) or (isinstance(m, Block) and m.is_moe))
    return list(dict.fromkeys(found))


def _check_mask(mask_BS: torch.Tensor | None, name: str) -> None:
    """ValueError unless ``mask_BS`` is None or a bool tensor."""
    if mask_BS is not None and (not isinstance(mask_BS, torch.Tensor) or mask_BS.dtype != torch.bool):
        raise ValueError(f"{name} must be None or a bool tensor of the tokens' shape, got {mask_BS!r:.80}")


def _token_mask(mask_BS: torch.Tensor, num_tokens: int, device: torch.device, name: str) -> torch.Tensor:
    """[T] ``mask_BS`` flattened onto ``device``; ValueError unless it is bool with one entry per token."""
    if mask_BS.dtype != torch.bool or mask_BS.numel() != num_tokens:
        raise ValueError(f"{name} must be bool with one entry per token ({num_tokens}), got "
                         f"{mask_BS.dtype} {tuple(mask_BS.shape)}")
    return mask_BS.reshape(-1).to(device)


def _selected(expert_ids_TK: torch.Tensor, mask_BS: torch.Tensor | None, name: str = "mask_BS") -> torch.Tensor:
    """[T] bool: the tokens that consulted, and are in the mask when there is one."""
    consulted_T = (expert_ids_TK != NOT_CONSULTED).any(1)
    if mask_BS is None:
        return consulted_T
    return consulted_T & _token_mask(mask_BS, consulted_T.numel(), consulted_T.device, name)


@contextmanager
def _hooks(modules: list[nn.Module], hook_for) -> Iterator[None]:
    """``hook_for(i)`` as a forward hook on ``modules[i]`` for the ``with`` block; removed on exit, even on
    error."""
    handles = []
    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_hook(hook_for(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def expert_hooks(layers: list[PureReasonerMoE], hook_for):
    """``hook_for(i)`` as a forward hook on layer i's knowledge experts for the ``with`` block."""
    return _hooks([layer.experts for layer in layers], hook_for)


@contextmanager
def reasoning_off(model: nn.Module) -> Iterator[None]:
    """Inside the ``with`` block the reasoning expert of every MoE FFN of ``model`` outputs zero (so does its
    gated term); the knowledge path and dense FFN blocks are unchanged. A model without MoE FFNs is unchanged.

    The reasoning expert still runs (its output is replaced), so this costs what an ordinary forward does; no
    gradient reaches it or its gate.

    Args:
        model: a module holding MoE FFNs (a PureReasonerLM, its HF wrapper, or one layer).
    """
    modules = [ffn.reasoning for ffn in moe_ffns(model) if getattr(ffn, "reasoning", None) is not None]

    def hook(_index: int):
        def zeroed(module, args, y_TD):
            return torch.zeros_like(y_TD)

        return zeroed

    with _hooks(modules, hook):
        yield


class TokenMask:
    """The state of a block whose hooks read a token mask: ``mask_BS`` (None: every token)."""

    def __init__(self, mask_BS: torch.Tensor | None):
        self.mask_BS = mask_BS


@contextmanager
def knowledge_mean(model: nn.Module, mask_BS: torch.Tensor | None = None, detach: bool = True
                   ) -> Iterator[TokenMask]:
    """Inside the ``with`` block, routing is unchanged but every consulting token of each MoE layer receives the
    mean of that layer's knowledge outputs over the call's consulting tokens instead of its own: what the experts
    add that does not depend on the token (a constant "key") survives it, what they store about particular tokens
    (facts about a person) does not. With ``mask_BS`` only the masked consulting tokens are replaced, by the mean
    over them (the others keep their own output), e.g. the positions that predict an answer: a key specific to
    such positions survives that too. By default the knowledge path sends no gradient inside the block (the
    experts run forward only); with ``detach=False`` the replaced tokens' constant is their mean with its
    gradient, so a loss on the ablated call trains the experts' and routers' mean output (and the kept tokens
    keep their own gradient).

    Args:
        model: a module holding PureReasonerMoE layers (a PureReasonerLM, or one layer).
        mask_BS: None, or a bool mask over the tokens of the next calls (x's shape without D); change it
            between calls through the yielded object's ``mask_BS``.
        detach: whether the knowledge output is cut from the graph (the eval's ablation) or not.

    Yields:
        TokenMask. Hooks are removed on exit, even on error.
    """
    layers = knowledge_layers(model)
    _check_mask(mask_BS, "knowledge_mean's mask_BS")
    state = TokenMask(mask_BS)

    def hook(_index: int):
        def replaced(module, args, knowledge_TD):
            selected_T = _selected(args[1], state.mask_BS, "knowledge_mean's mask_BS")
            if detach:
                knowledge_TD = knowledge_TD.detach()
            mean_D = masked_mean(knowledge_TD, selected_T)
            return torch.where(selected_T.unsqueeze(1), mean_D, knowledge_TD)

        return replaced

    with expert_hooks(layers, hook):
        yield state


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

    with expert_hooks(layers, hook):
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

    with expert_hooks(layers, hook):
        yield state


@contextmanager
def gradient_routing(model: nn.Module, frozen_BS: torch.Tensor) -> Iterator[TokenMask]:
    """Knowledge gradient routing: inside the ``with`` block, where ``frozen_BS`` is set the reasoning expert's
    output (and its gate's logit) is detached in every MoE layer, so no gradient reaches the reasoning expert (or,
    through it, the layers below) from that token; the forward values are unchanged. The graph keeps the
    detachment, so the backward may run after the block.

    Args:
        model: a module holding PureReasonerMoE layers (a PureReasonerLM, or one layer).
        frozen_BS: bool mask over the tokens of the next calls (x's shape without D); change it between calls
            through the yielded object's ``mask_BS``.

    Yields:
        TokenMask. Hooks are removed on exit, even on error.
    """
    layers = knowledge_layers(model)
    if frozen_BS is None:
        raise ValueError("gradient_routing needs frozen_BS, a bool mask of the tokens to freeze")
    _check_mask(frozen_BS, "frozen_BS")
    state = TokenMask(frozen_BS)
    modules = [m for layer in layers for m in (layer.reasoning, layer.reasoning_gate) if m is not None]

    def hook(_index: int):
        def detached(module, args, y_TX):
            frozen_T1 = _token_mask(state.mask_BS, y_TX.shape[0], y_TX.device, "frozen_BS").unsqueeze(1)
            return torch.where(frozen_T1, y_TX.detach(), y_TX)

        return detached

    with _hooks(modules, hook):
        yield state

"""Slot-selected knowledge updates: write new facts only into the expert units the old facts rarely use.

Sparse Memory Finetuning (Lin et al., 2025) updates, for each batch of new data, only the memory slots that the new
data uses much more than the pretraining data does (a TF-IDF ranking against a background corpus), and reports 11%
forgetting where full fine-tuning forgets 89%. Our knowledge experts are SwiGLU MLPs; a hidden unit f of expert e
(row f of ``w1``/``w3``, column f of ``w2``) is a key-value memory slot: it adds ``gate * h_f * w2[e, f, :]`` to a
consulting token's output, ``h_f = silu(x w1[:, f]) * (x w3[:, f])``.

``unit_usage``   per MoE layer, [E, F]: the summed ``|gate * h_f|`` over the tokens routed to e (how much the unit
                 writes into the residual stream over a corpus);
``slot_scores``  TF-IDF of the update's usage against the background's: ``p * -log(q + 1/N)``, with p and q each
                 corpus's share of the layer's total usage and N = E * F (one uniform access of smoothing);
``select_slots`` the top ``per_layer`` units of each layer;
``mask_gradients`` before the optimizer is built: every parameter outside the selected units' rows and columns is
                 frozen (routers, attention, reasoning experts included), and the experts' gradients are
                 multiplied by the selection, so AdamW (with weight decay 0) leaves every other entry bit for bit
                 where it was.

Shape legend: T tokens, D model dim, F expert width, E experts, K top-k slots, L MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.moe.interventions import expert_hooks, knowledge_layers

EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD")


@torch.no_grad()
def unit_usage(model: PureReasonerLM, rows: Sequence[Sequence[int]], batch_size: int = 16) -> list[torch.Tensor]:
    """How much each knowledge-expert unit writes over ``rows`` (token ids, one sequence each, no padding).

    Returns:
        Per MoE layer (block order), [E, F] float64: the sum over routed (token, slot) pairs of ``|gate * h_f|``.
    Raises:
        ValueError: no rows, an empty row, or a model without MoE layers.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError(f"unit_usage needs non-empty rows, got {len(rows)} rows")
    layers = knowledge_layers(model)
    usage = [torch.zeros(layer.experts.w1_EDF.shape[0], layer.experts.w1_EDF.shape[2], dtype=torch.float64)
             for layer in layers]
    valid = {"T": None}

    def hook_for(i: int):
        def hook(module, args, _output):
            x_TD, ids_TK, gates_TK = args
            routed_TK = (ids_TK >= 0) & valid["T"][:, None]
            for e in ids_TK[routed_TK].unique().tolist():
                tok, slot = (routed_TK & (ids_TK == e)).nonzero(as_tuple=True)
                x_RD, g_R = x_TD[tok].float(), gates_TK[tok, slot].float()
                h_RF = F.silu(x_RD @ module.w1_EDF[e].float()) * (x_RD @ module.w3_EDF[e].float())
                usage[i][e] += (g_R[:, None] * h_RF).abs().sum(0).double()
        return hook

    was_training = model.training
    model.eval()
    try:
        with expert_hooks(layers, hook_for):
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                seq = max(len(r) for r in batch)
                idx_BS = torch.zeros(len(batch), seq, dtype=torch.long)
                valid_BS = torch.zeros(len(batch), seq, dtype=torch.bool)
                for b, r in enumerate(batch):  # right padding: causal attention keeps it out of the real tokens
                    idx_BS[b, : len(r)] = torch.tensor(r, dtype=torch.long)
                    valid_BS[b, : len(r)] = True
                valid["T"] = valid_BS.reshape(-1).to(layers[0].experts.w1_EDF.device)
                model(idx_BS.to(valid["T"].device))
    finally:
        model.train(was_training)
    return usage


def slot_scores(update_EF: torch.Tensor, background_EF: torch.Tensor) -> torch.Tensor:
    """TF-IDF of one layer's units: ``p * -log(q + 1/N)`` (module docstring). [E, F] -> [E, F] float64.

    Raises:
        ValueError: shapes differ, or the update routed nothing to this layer's experts.
    """
    if update_EF.shape != background_EF.shape:
        raise ValueError(f"usage shapes differ: {tuple(update_EF.shape)} vs {tuple(background_EF.shape)}")
    total = update_EF.sum()
    if total <= 0:
        raise ValueError("the update's rows consulted no knowledge expert of this layer: nothing to select")
    p = update_EF.double() / total
    q = background_EF.double() / background_EF.sum().clamp(min=torch.finfo(torch.float64).tiny)
    return p * -torch.log(q + 1.0 / update_EF.numel())


def select_slots(scores: Sequence[torch.Tensor], per_layer: int) -> list[torch.Tensor]:
    """Per layer, [E, F] bool: its ``per_layer`` highest-scoring units (ties: the lower flat index).

    Raises:
        ValueError: ``per_layer`` outside 1..E*F.
    """
    out = []
    for score_EF in scores:
        if not 1 <= per_layer <= score_EF.numel():
            raise ValueError(f"slots per layer must be in 1..{score_EF.numel()} (E * F), got {per_layer}")
        order = torch.argsort(score_EF.reshape(-1), descending=True, stable=True)
        chosen = torch.zeros(score_EF.numel(), dtype=torch.bool)
        chosen[order[:per_layer]] = True
        out.append(chosen.view_as(score_EF))
    return out


def parameter_masks(model: PureReasonerLM, selected: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{parameter name: 0/1 mask broadcastable to it}`` for the experts' weights of each MoE layer:
    ``w1``/``w3`` [E, 1, F], ``w2`` [E, F, 1]. Raises ValueError when ``selected`` does not match the layers."""
    layers = knowledge_layers(model)
    if len(selected) != len(layers):
        raise ValueError(f"{len(selected)} selections for {len(layers)} MoE layers")
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for layer, chosen_EF in zip(layers, selected, strict=True):
        w1 = layer.experts.w1_EDF
        if chosen_EF.shape != (w1.shape[0], w1.shape[2]):
            raise ValueError(f"selection {tuple(chosen_EF.shape)} does not match the experts' [E, F] = "
                             f"{(w1.shape[0], w1.shape[2])}")
        m = chosen_EF.to(w1.dtype)
        for attr, shaped in zip(EXPERT_WEIGHTS, (m[:, None, :], m[:, None, :], m[:, :, None]), strict=True):
            param = getattr(layer.experts, attr)
            masks[names[id(param)]] = shaped.to(param.device)
    return masks


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Freeze every parameter not in ``masks``; multiply the gradients of those in it by their mask (hooks that
    live as long as the parameters). Call before the optimizer is built.

    Returns:
        The names of the parameters left trainable.
    Raises:
        ValueError: a mask naming no parameter, or one that does not broadcast to its parameter's shape.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks name no parameter of the model: {unknown[:3]}")
    for name, param in params.items():
        mask = masks.get(name)
        param.requires_grad_(mask is not None)
        if mask is None:
            continue
        try:
            fits = torch.broadcast_shapes(mask.shape, param.shape) == param.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to {name} {tuple(param.shape)}")
        param.register_hook(lambda grad, m=mask: grad * m)
    return sorted(masks)


def selection_summary(selected: Sequence[torch.Tensor]) -> dict:
    """What ``slots.json`` records: per layer, the chosen (expert, unit) pairs and how many units each expert gave."""
    layers = []
    for chosen_EF in selected:
        pairs = chosen_EF.nonzero().tolist()
        layers.append({"units": len(pairs), "of": chosen_EF.numel(),
                       "per_expert": chosen_EF.sum(1).tolist(), "chosen": pairs})
    return {"score": "tf-idf: p * -log(q + 1/N)", "layers": layers,
            "share": math.fsum(x["units"] for x in layers) / max(1, sum(x["of"] for x in layers))}

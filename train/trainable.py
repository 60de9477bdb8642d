"""Which parameters a run trains (``train.trainable``): all of them, or only the knowledge path.

``experts`` narrows ``knowledge`` to the knowledge experts' weights (routers frozen too, and the loop leaves their
consult and balance controllers alone): the slot-selected update
(``python -m pure_reasoner.train.update --slots N``, module ``train.slots``) trains only chosen units of them, and a
router that kept learning would move the old facts' routing.

``knowledge`` leaves trainable only each MoE layer's knowledge experts and router (its projections; the routing
controllers are buffers and keep steering as in any run): attention, embeddings, norms, the head and every
reasoning expert (and its gate) stay as they were. That is the knowledge update: new facts are written where
facts live, and what reads and reasons is untouched by construction. A model without MoE layers (the dense
baseline) has no knowledge path: it fine-tunes ``all``.

``reasoner`` is the complement of ``knowledge``: the knowledge experts and routers are frozen (their consult and
balance controllers too, so routing stays the starting model's) and everything else trains. A phase that
teaches reading (drills whose people are not the world's) then cannot write those people into the experts over
the world's facts.

``call_always_on_detached`` serves ``objective.always_on_grad=ablated``: one forward whose always-on parameters
(every one but the knowledge experts' and routers') are detached, so its loss trains only the knowledge path.
"""

from __future__ import annotations

import torch

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.train.config import TRAINABLE


def knowledge_parameter_names(model: PureReasonerLM, routers: bool = True) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the knowledge experts' and (with ``routers``) routers'
    parameters."""
    moe = {id(layer) for layer in model.moe_layers()}
    names = set()
    for prefix, module in model.named_modules():
        if id(module) in moe:
            parts = {"experts": module.experts, **({"router": module.router} if routers else {})}
            for sub, part in parts.items():
                names |= {f"{prefix}.{sub}.{name}" for name, _ in part.named_parameters()}
    return names


def set_trainable(model: PureReasonerLM, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` (before the optimizer or DeepSpeed engine sees the parameters).

    Returns:
        The names of the frozen parameters ([] for ``all``).

    Raises:
        ValueError: an unknown ``mode``, or ``knowledge`` / ``experts`` on a model without MoE layers.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {mode!r}")
    if mode == "all":
        return []
    if not model.moe_layers():
        raise ValueError(f"train.trainable={mode} needs MoE layers (knowledge experts); this model has none: "
                         "fine-tune a dense model with train.trainable=all")
    knowledge = knowledge_parameter_names(model, routers=mode != "experts")
    frozen = []
    for name, param in model.named_parameters():
        train = (name in knowledge) != (mode == "reasoner")
        param.requires_grad_(train)
        if not train:
            frozen.append(name)
    return frozen


def call_always_on_detached(model: PureReasonerLM, knowledge: set[str], **inputs):
    """``model(**inputs)`` with every parameter not named in ``knowledge`` detached (``torch.func.functional_call``):
    the forward values are the model's own, gradients still flow through the detached weights to the activations
    (and from them to the knowledge parameters of every layer), but no always-on parameter gets one.

    Args:
        model: the module to call (a PureReasonerLM, or a DeepSpeed engine's ``module``).
        knowledge: ``knowledge_parameter_names(model)``, the parameters that keep their gradient.
    """
    detached = {name: param.detach() for name, param in model.named_parameters() if name not in knowledge}
    return torch.func.functional_call(model, detached, args=(), kwargs=inputs, strict=False)

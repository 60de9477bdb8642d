"""pure-reasoner: an always-on reasoning expert plus occasionally-consulted knowledge experts.

Importing this package never imports triton.
"""

from pure_reasoner.moe.config import KnowledgeConfig, ModelConfig, MoEConfig
from pure_reasoner.moe.interventions import (
    gradient_routing,
    knowledge_mean,
    mean_ablation,
    reasoning_off,
    record_knowledge_means,
)
from pure_reasoner.moe.layer import MoEStats, PureReasonerMoE
from pure_reasoner.moe.model import LMOutput, PureReasonerLM
from pure_reasoner.moe.presets import PRESET_NAMES, preset
from pure_reasoner.moe.trace import record_knowledge_trace

__all__ = [
    "PRESET_NAMES",
    "KnowledgeConfig",
    "LMOutput",
    "MoEConfig",
    "MoEStats",
    "ModelConfig",
    "PureReasonerLM",
    "PureReasonerMoE",
    "gradient_routing",
    "knowledge_mean",
    "mean_ablation",
    "preset",
    "reasoning_off",
    "record_knowledge_means",
    "record_knowledge_trace",
]

from pure_reasoner.toplevel import defer_to_installed

# Imported as a bare top-level name from the repository root: the installed package of that name wins.
defer_to_installed(__name__, __file__)

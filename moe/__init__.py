"""pure-reasoner: an always-on reasoning expert plus occasionally-consulted knowledge experts.

Importing this package never imports triton.
"""

from moe.config import KnowledgeConfig, ModelConfig, MoEConfig
from moe.interventions import mean_ablation, record_knowledge_means
from moe.layer import MoEStats, PureReasonerMoE
from moe.model import LMOutput, PureReasonerLM
from moe.presets import PRESET_NAMES, preset
from moe.trace import record_knowledge_trace

__all__ = [
    "PRESET_NAMES",
    "KnowledgeConfig",
    "LMOutput",
    "MoEConfig",
    "MoEStats",
    "ModelConfig",
    "PureReasonerLM",
    "PureReasonerMoE",
    "mean_ablation",
    "preset",
    "record_knowledge_means",
    "record_knowledge_trace",
]

"""PureReasonerLM behind Hugging Face transformers' classes; importing this module registers them.

    import pure_reasoner.moe.hf  # registers AutoConfig / AutoModelForCausalLM for model_type "pure_reasoner"
    model = AutoModelForCausalLM.from_pretrained(DIR)          # or, without the import: trust_remote_code=True
    tokenizer = AutoTokenizer.from_pretrained(DIR)

``DIR`` is an export (``python -m pure_reasoner.train.export RUN``; layout in ``moe.hf_files``). Importing this module
also registers our knowledge path as the experts implementation ``"pure_reasoner"`` (``moe.hf_experts``).
Importing ``moe`` itself never imports transformers (seconds of import time the training job does not need).

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from pure_reasoner.moe.checkpoint import config_from_dict
from pure_reasoner.moe.hf_experts import register_experts_implementation
from pure_reasoner.moe.hf_files import MODEL_FIELDS, MODEL_TYPE
from pure_reasoner.moe.model import PureReasonerLM, rope_tables


class PureReasonerConfig(PreTrainedConfig):
    """transformers' view of a ``ModelConfig``: its fields as attributes (validated by ``model_config()``), the
    usual transformers names mapped onto them, and ``knowledge_off``: the default of the knowledge ablation."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}

    knowledge_off: bool = False
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.knowledge_off, bool):
            raise ValueError(f"knowledge_off must be a bool, got {self.knowledge_off!r}")
        self.model_config()  # ValueError naming a bad or missing value now, not when the model is built

    def model_config(self):
        """The ModelConfig these attributes describe (defaults for the ones not set)."""
        return config_from_dict({name: getattr(self, name) for name in MODEL_FIELDS if hasattr(self, name)})


class PureReasonerForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``PureReasonerLM`` (``.model``) with transformers' causal-LM interface: ``forward(input_ids, ...)`` returns
    ``CausalLMOutputWithPast``; ``generate()`` works without a KV cache (each step re-reads the context)."""

    config_class = PureReasonerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: PureReasonerConfig):
        super().__init__(config)
        self.model = PureReasonerLM(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        # Loading builds the model on the meta device and loads every saved tensor; what is left is the rotary
        # tables (not saved: they follow from the config). Fresh models keep PureReasonerLM's own init.
        if isinstance(module, PureReasonerLM):
            cfg = module.cfg
            cos_SQ, sin_SQ = rope_tables(cfg.max_seq_len, cfg.attn_head_dim, cfg.rope_theta)
            init.copy_(module.rope_cos, cos_SQ)
            init.copy_(module.rope_sin, sin_SQ)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, knowledge_off: bool | None = None,
                **_unused) -> CausalLMOutputWithPast:
        """Args: input_ids [B, S]; attention_mask [B, S] or None: ones, then only zeros (right padding, which a
        causal model can ignore; left padding raises ValueError); labels [B, S] (-100 = ignore; shifted here, as
        transformers' causal LMs do); knowledge_off (default ``config.knowledge_off``): the knowledge experts are off.
        Research interventions (``moe.interventions``) apply to this model as to the one it wraps.

        Returns: logits [B, S, V]; loss (cross-entropy + router aux losses) when labels are given.
        """
        if "reasoning_off" in _unused:  # an intervention, not an argument: say so rather than ignore it
            raise ValueError("reasoning_off is not an argument: use `with moe.interventions.reasoning_off(model)`")
        if attention_mask is not None:
            _check_right_padded(attention_mask)
        knowledge_off = self.config.knowledge_off if knowledge_off is None else knowledge_off
        targets_BS = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
        out = self.model(input_ids, targets_BS, knowledge_off=knowledge_off)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits_BSV)


def _check_right_padded(mask_BS: torch.Tensor) -> None:
    """ValueError unless every row of the mask is ones then zeros (the model attends to every earlier token)."""
    mask_BS = mask_BS.bool()
    if bool((mask_BS[:, 1:] & ~mask_BS[:, :-1]).any()):
        raise ValueError("attention_mask has padding before tokens (left padding): PureReasonerForCausalLM attends "
                         "to every earlier position, so pad on the right (tokenizer.padding_side='right')")


def register() -> None:
    """Register the auto classes and the experts implementation (idempotent)."""
    AutoConfig.register(MODEL_TYPE, PureReasonerConfig, exist_ok=True)
    AutoModelForCausalLM.register(PureReasonerConfig, PureReasonerForCausalLM, exist_ok=True)
    register_experts_implementation()


register()

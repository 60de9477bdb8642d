"""Mode-seeking distillation in the training loop (``objective.kind=distill``).

The teacher (a ``train.export`` directory, frozen, in eval mode) reads each packed knowledge-in-context
sequence; the student reads the same sequence without its supplied tokens (``objectives.drop_context``) and
minimises ``ce_weight`` * CE + ``kl_weight`` * KL(student || teacher) at the aligned positions, plus its MoE
aux loss. With ``objective.anchor_weight`` (``kind=lm``) the teacher instead reads the model's own tokens and
anchors its closed-book recall (``anchor_loss``). Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pure_reasoner.moe import LMOutput, PureReasonerLM
from pure_reasoner.moe.checkpoint import load_pretrained
from pure_reasoner.train.chain import missing_export
from pure_reasoner.train.config import Config, ObjectiveConfig
from pure_reasoner.train.init_from import adopt_tokenizer
from pure_reasoner.train.objectives import distillation_loss, drop_context, reverse_kl


def load_teacher(cfg: Config, run_dir: Path, rank: int) -> PureReasonerLM | None:
    """The frozen teacher ``objective.teacher`` for ``objective.kind=distill`` or ``objective.anchor_weight`` (None
    otherwise, and with ``objective.relocate_at``: that run loads its own export at that step, ``train.relocation``).
    Rank 0 puts the teacher's tokenizer in the run directory when it has none yet, so the student reads its token ids.

    Raises ValueError naming the teacher when it cannot be loaded or its vocabulary differs from the student's.
    """
    if (cfg.objective.kind != "distill" and cfg.objective.anchor_weight == 0) or cfg.objective.relocates:
        return None
    src = Path(cfg.objective.teacher)
    if not src.is_dir():
        raise ValueError(missing_export("objective.teacher", cfg.objective.teacher))
    teacher = load_pretrained(src).eval().requires_grad_(False)
    if teacher.cfg.vocab_size != cfg.model.vocab_size:
        raise ValueError(
            f"objective.teacher={src} has vocab_size {teacher.cfg.vocab_size}, model.vocab_size={cfg.model.vocab_size}"
        )
    adopt_tokenizer(src, run_dir, rank, "objective.teacher")
    return teacher


def distill_forward(engine, teacher: PureReasonerLM, idx_BS: torch.Tensor, targets_BS: torch.Tensor,
                    obj: ObjectiveConfig) -> LMOutput:
    """The student's LMOutput on the context-free view of the batch, its ``loss`` the distillation loss + aux.

    Args:
        engine: the student (a DeepSpeed engine or the model); called as ``engine(idx_BS)``.
        idx_BS, targets_BS: [B, S] a packed knowledge-in-context batch (IGNORE_INDEX on supplied tokens).
    """
    with torch.no_grad():
        teacher_logits_BSV = teacher(idx_BS).logits_BSV
    view = drop_context(idx_BS, targets_BS, pad_id=0)
    out = engine(view.ids_BS)
    loss, _ = distillation_loss(out.logits_BSV, teacher_logits_BSV, view, obj.kl_weight, obj.ce_weight,
                                       obj.temperature)
    return out._replace(loss=loss + out.aux_loss)


def anchor_loss(logits_BSV: torch.Tensor, teacher: PureReasonerLM, idx_BS: torch.Tensor, anchor_BS: torch.Tensor,
                obj: ObjectiveConfig, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """``anchor_weight`` * KL(model || teacher) at the ``anchor_BS`` positions (0-d), the teacher (frozen)
    reading the same ``idx_BS`` [B, S] (and ``doc_ids_BS``); ``logits_BSV`` [B, S, V] are the model's, knowledge
    on."""
    with torch.no_grad():
        teacher_logits_BSV = teacher(idx_BS, doc_ids_BS=doc_ids_BS).logits_BSV
    return obj.anchor_weight * reverse_kl(logits_BSV, teacher_logits_BSV, anchor_BS, obj.temperature)

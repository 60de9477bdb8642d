"""Training objectives as pure functions on tensors: plain LM, knowledge in context, mode-seeking distillation.

Shape legend: B batch, S (student) sequence, T teacher sequence, V vocabulary, N flattened positions.
Targets follow ``PureReasonerLM``: ``targets_BS[b, s]`` is the token that position ``s`` must predict, -100 to ignore.

Knowledge in context (``train.world.generator`` rows with a ``context``): the facts are supplied before the text and no
loss is taken on them, so the model is trained to *use* facts from its context. Build a row with
``in_context_tokens`` (ids + per-token loss mask, for packing pipelines) or ``in_context_example`` (inputs and
targets of one unpacked row).

Knowledge-off forgetting (``objective.forget_weight``, ``objective.read_weight``): a second forward pass with
the knowledge experts switched off (``knowledge_off_loss``) is taught to *know nothing and read everything*:
at the tokens that must recall a fact from memory it is pushed to the uniform distribution (with
``objective.forget_target=world_prior``, to the world's prior over that attribute's values), and on text whose
facts are supplied (context rows, reading drills) it is trained by cross-entropy. So the always-on path
(reasoning experts, attention, embeddings) is trained not to hold the facts, while the full model must still
recall them: the only parameters left to hold them are the knowledge experts'.

Mode-seeking distillation (``objective.kind=distill``, run by ``train.distill``): the teacher reads a packed
knowledge-in-context sequence, the student the same sequence without its supplied tokens (``drop_context``);
where both predict the same next token the student minimises the reverse KL(student || teacher), which (unlike
forward KL) puts its mass on one of the teacher's modes instead of spreading it over all of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pure_reasoner.moe import ModelConfig, MoEStats
    from pure_reasoner.train.config import ObjectiveConfig
    from pure_reasoner.train.world.prior import ValuePrior

IGNORE_INDEX = -100


def shift_targets(ids_BS: torch.Tensor, loss_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a block of tokens.

    Args:
        ids_BS: [B, S] (or [S]) token ids.
        loss_mask_BS: same shape, bool; False on tokens that are supplied, not predicted (no loss on them).

    Returns:
        inputs [B, S-1] = ids[:, :-1]; targets [B, S-1] = ids[:, 1:], IGNORE_INDEX where the mask is False.
    """
    if ids_BS.shape[-1] < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got shape {tuple(ids_BS.shape)}")
    targets = ids_BS[..., 1:].clone()
    if loss_mask_BS is not None:
        if loss_mask_BS.shape != ids_BS.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask_BS.shape)} != ids shape {tuple(ids_BS.shape)}")
        targets = targets.masked_fill(~loss_mask_BS[..., 1:].bool(), IGNORE_INDEX)
    return ids_BS[..., :-1], targets


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Plain LM: mean next-token cross-entropy (fp32) over targets != IGNORE_INDEX."""
    return F.cross_entropy(logits_BSV.float().flatten(0, -2), targets_BS.flatten(), ignore_index=IGNORE_INDEX)


def in_context_tokens(context_ids: Sequence[int], text_ids: Sequence[int]) -> tuple[list[int], list[bool]]:
    """Knowledge in context, for packing: the supplied facts, then the text; loss only on text tokens.

    Returns:
        ids (len C + X) and a per-token loss mask (False on the C context tokens). Pack the row as one unit
        and feed the mask to ``shift_targets``: the first text token is still predicted (from the last
        context token), no context token is.
    """
    return [*context_ids, *text_ids], [False] * len(context_ids) + [True] * len(text_ids)


def in_context_example(context_ids: Sequence[int], text_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpacked row: (input_ids [C+X-1], targets [C+X-1]) with IGNORE_INDEX on the supplied facts."""
    ids, mask = in_context_tokens(context_ids, text_ids)
    return shift_targets(torch.tensor(ids), torch.tensor(mask))


def knowledge_off_loss(
    logits_BSV: torch.Tensor,
    targets_BS: torch.Tensor,
    forget_BS: torch.Tensor,
    read_BS: torch.Tensor,
    forget_weight: float,
    read_weight: float,
    prior_node_BS: torch.Tensor | None = None,
    prior: ValuePrior | None = None,
    reverse: bool = False,
    target_logits_BSV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The knowledge-off pass's loss: ``forget_weight * forget + read_weight * read``.

    forget: ``forget_term``, the mean over ``forget_BS`` positions of KL(p || uniform) or, where ``prior_node_BS``
        names a node of ``prior``, of a KL between p and the world's prior q there (KL(q || p), or KL(p || q) with
        ``reverse``); with ``target_logits_BSV`` (another pass's [B, S, V] logits, detached here), KL(p || softmax
        of them) at every ``forget_BS`` position instead.
    read: cross-entropy on the targets at ``read_BS`` positions (IGNORE_INDEX targets excluded).
    Each term is 0 when its mask selects nothing.

    Args:
        logits_BSV: [B, S, V] logits of the model run with ``knowledge_off=True``.
        targets_BS: [B, S] next-token targets (IGNORE_INDEX = none).
        forget_BS, read_BS: [B, S] bool masks.
        prior_node_BS, prior, reverse: see ``forget_term``.

    Returns:
        the loss and its detached parts ``{"forget", "read"}``.
    """
    for name, mask in (("forget_BS", forget_BS), ("read_BS", read_BS)):
        if mask.shape != targets_BS.shape or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be bool of shape {tuple(targets_BS.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    if target_logits_BSV is None:
        forget = forget_term(logits_BSV, forget_BS, prior_node_BS, prior, reverse)
    else:
        forget = reverse_kl(logits_BSV, target_logits_BSV.detach(), forget_BS)
    read_targets_BS = targets_BS.masked_fill(~read_BS, IGNORE_INDEX)
    read = F.cross_entropy(logits_BSV.float().flatten(0, 1), read_targets_BS.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / (read_targets_BS != IGNORE_INDEX).sum().clamp(min=1)
    return forget_weight * forget + read_weight * read, {"forget": forget.detach(), "read": read.detach()}


PRIOR_SMOOTHING = 1e-3  # the uniform mass mixed into the world's prior for the reverse KL (finite off its values)


def forget_term(logits_BSV: torch.Tensor, forget_BS: torch.Tensor, prior_node_BS: torch.Tensor | None = None,
                prior: ValuePrior | None = None, reverse: bool = False) -> torch.Tensor:
    """0-d mean over the ``forget_BS`` positions of what the knowledge-off model must not know there.

    Without a prior: KL(p || uniform) = log V - H(p), in [0, log V]; 0 iff p is uniform over the whole vocabulary.
    With ``prior`` (``objective.forget_target=world_prior``): at positions whose ``prior_node_BS`` is >= 0, KL(q ||
    p) with q the world's prior over the next value token (``train.world.prior``: uniform over the values of the
    attribute that continue what is written); with ``reverse`` (``world_prior_reverse``) KL(p || q_eps), q_eps =
    (1 - eps) q + eps / V with eps = ``PRIOR_SMOOTHING``, which, like the uniform term, grows with the log of how
    confident p is where q is not. Either is 0 iff p equals the prior (q_eps) there, so the model may still know
    which values exist and how a value it has begun goes on, but not whose it is. Other positions keep KL(p ||
    uniform).

    Args:
        logits_BSV: [B, S, V] logits.
        forget_BS: [B, S] bool.
        prior_node_BS: [B, S] int64 prior node of each position's target, -1 for none (needed with ``prior``).
        prior: the world's ``ValuePrior`` or None.
        reverse: KL(p || q_eps) instead of KL(q || p).
    """
    if prior is None:
        return reverse_kl(logits_BSV, torch.zeros_like(logits_BSV), forget_BS)  # uniform teacher: zero logits
    if prior_node_BS is None or prior_node_BS.shape != forget_BS.shape:
        raise ValueError(f"a prior needs prior_node_BS of shape {tuple(forget_BS.shape)}, got "
                         f"{None if prior_node_BS is None else tuple(prior_node_BS.shape)}")
    log_p_NV = F.log_softmax(logits_BSV[forget_BS].float(), dim=-1)
    node_N = prior_node_BS[forget_BS]
    known_N = node_N >= 0
    vocab = log_p_NV.shape[-1]
    neg_entropy_N = (log_p_NV.exp() * log_p_NV).sum(-1)
    uniform_N = neg_entropy_N + math.log(vocab)  # KL(p || uniform)
    row_E, token_E, logq_E = prior.entries(node_N[known_N])
    log_p_E = log_p_NV[known_N][row_E, token_E]
    zeros_N = torch.zeros(int(known_N.sum()), device=logits_BSV.device)
    if reverse:  # sum_v p log p - sum_v p log q_eps, q_eps = eps / V off the prior's tokens
        off_log = math.log(PRIOR_SMOOTHING / vocab)
        on_log_E = torch.logaddexp(logq_E + math.log1p(-PRIOR_SMOOTHING), torch.full_like(logq_E, off_log))
        p_E = log_p_E.exp()
        cross_N = zeros_N.index_add(0, row_E, p_E * on_log_E) + off_log * (1 - zeros_N.index_add(0, row_E, p_E))
        prior_N = neg_entropy_N[known_N] - cross_N
    else:
        prior_N = zeros_N.index_add(0, row_E, logq_E.exp() * (logq_E - log_p_E))  # KL(q || p)
    return (prior_N.sum() + uniform_N[~known_N].sum()) / max(node_N.numel(), 1)


def forget_pass(model, idx_BS: torch.Tensor, targets_BS: torch.Tensor, forget_BS: torch.Tensor,
                read_BS: torch.Tensor, objective: ObjectiveConfig, doc_ids_BS: torch.Tensor | None = None,
                prior_node_BS: torch.Tensor | None = None, prior: ValuePrior | None = None) -> torch.Tensor:
    """One micro-batch's knowledge-off pass: ``model`` (a PureReasonerLM or its engine) run with
    ``objective.forget_ablation`` (``knowledge_off``, or ``recall_mean``: ``moe.interventions.knowledge_mean`` at
    the ``forget_BS`` tokens, or at every consulting token with ``objective.mean_tokens=consulting``; ``both``: one
    pass of each, the second with ``objective.mean_read_weight`` as its read weight and ``objective.
    mean_forget_weight``, where set, as its forget weight), scored by
    ``knowledge_off_loss`` (a pass whose forget target, ``objective.forget_target`` or for the ``recall_mean`` pass
    ``objective.mean_forget_target``, is a world prior scores it against ``prior`` at ``prior_node_BS``; a mean
    pass whose target is ``knowledge_off`` against the knowledge-off pass's prediction, detached; with
    ``objective.mean_grad`` the ``recall_mean`` pass's constant keeps its gradient into the experts and routers).
    Returns the weighted loss (0-d)."""
    from pure_reasoner.moe import interventions
    from pure_reasoner.train.config import PRIOR_TARGETS

    total = torch.zeros((), device=idx_BS.device)
    off_logits_BSV = None  # the knowledge-off pass's, for a mean pass scored against it (it runs first)
    for ablation, forget_weight, read_weight, target in _forget_passes(objective):
        off = ablation == "knowledge_off"
        mean_BS = forget_BS if objective.mean_tokens == "recall" else None  # None: every consulting token
        ablated = (contextlib.nullcontext() if off
                   else interventions.knowledge_mean(model, mean_BS, detach=not objective.mean_grad))
        with ablated:
            # doc_ids_BS: the ordinary pass's document mask (data.doc_mask)
            logits_BSV = model(idx_BS, knowledge_off=off, doc_ids_BS=doc_ids_BS).logits_BSV
        loss, _ = knowledge_off_loss(logits_BSV, targets_BS, forget_BS, read_BS, forget_weight,
                                     read_weight, prior_node_BS, prior if target in PRIOR_TARGETS else None,
                                     reverse=target == "world_prior_reverse",
                                     target_logits_BSV=off_logits_BSV if target == "knowledge_off" else None)
        if off and objective.mean_forget_target == "knowledge_off":
            off_logits_BSV = logits_BSV.detach()
        total = total + loss
    return total


def _forget_passes(objective: ObjectiveConfig) -> list[tuple[str, float, float, str]]:
    """(ablation, forget weight, read weight, forget target) of each pass ``objective.forget_ablation`` runs: the
    ``recall_mean`` pass's forget weight and target are ``objective.mean_forget_weight`` / ``mean_forget_target``
    where set."""
    mean_weight = objective.forget_weight if objective.mean_forget_weight is None else objective.mean_forget_weight
    mean_target = objective.mean_forget_target or objective.forget_target
    if objective.forget_ablation == "both":
        return [("knowledge_off", objective.forget_weight, objective.read_weight, objective.forget_target),
                ("recall_mean", mean_weight, objective.mean_read_weight, mean_target)]
    if objective.forget_ablation == "recall_mean":
        return [("recall_mean", mean_weight, objective.read_weight, mean_target)]
    return [(objective.forget_ablation, objective.forget_weight, objective.read_weight, objective.forget_target)]


def consult_loss(consult_logit_T: torch.Tensor | None, consult_target_T: torch.Tensor) -> torch.Tensor:
    """0-d mean BCE of one layer's [T] consult logits against [T] bool targets (supervised consult).

    Raises ValueError when there is no consult logit (the router's mechanism is not ``gate``)."""
    if consult_logit_T is None:
        raise ValueError("consult targets need mechanism 'gate' (a consult logit to train)")
    return F.binary_cross_entropy_with_logits(consult_logit_T, consult_target_T.float())


def consult_supervision(stats: Sequence[MoEStats], consult_target_BS: torch.Tensor, coef: float) -> torch.Tensor:
    """Supervised consult: ``coef`` * the sum over MoE layers of ``consult_loss`` of each layer's consult logits
    (``MoEStats.consult_logit_T``) against ``consult_target_BS`` (the tokens that should consult). Layers whose
    router did not run (``knowledge_off``) add nothing.

    Args:
        stats: the MoE layers' stats of one forward (``LMOutput.stats``).
        consult_target_BS: bool, one entry per token of that forward (x's shape without D).
        coef: the weight, ``model.knowledge.consult_loss_coef``.

    Returns:
        0-d fp32 loss, with gradient to the routers' consult gates.
    """
    total = torch.zeros((), dtype=torch.float32, device=consult_target_BS.device)
    for layer_stats in stats:
        if layer_stats.router_inputs_ND is None:  # the router did not run
            continue
        target_T = consult_target_BS.reshape(-1)
        if consult_target_BS.dtype != torch.bool or target_T.numel() != layer_stats.num_tokens:
            raise ValueError(f"consult_target_BS must be bool with one entry per token ({layer_stats.num_tokens}), "
                             f"got {consult_target_BS.dtype} {tuple(consult_target_BS.shape)}")
        total = total + coef * consult_loss(layer_stats.consult_logit_T, target_T)
    return total


def forget_pass_flops(model_cfg: ModelConfig, objective: ObjectiveConfig, seq_len: int,
                      stats: Sequence[MoEStats] | None = None) -> float:
    """Training FLOPs per token of ``forget_pass``: ``knowledge_off`` runs no router and no expert
    (``moe.flops.knowledge_off``); ``recall_mean`` runs both forward only (``moe.flops.knowledge_mean``; forward
    and backward with ``objective.mean_grad``) on the
    routed rows of ``stats`` (None: the target rate); ``both`` the sum."""
    from pure_reasoner.moe import flops

    cost = {"knowledge_off": lambda: flops.knowledge_off(model_cfg, seq_len).flops_per_token,
            "recall_mean": lambda: flops.knowledge_mean(model_cfg, seq_len, stats,
                                                        detached=not objective.mean_grad).flops_per_token}
    return sum(cost[ablation]() for ablation, *_ in _forget_passes(objective))


def reverse_kl(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over valid positions of KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)), times temperature².

    Computed in fp32 from log-softmaxes (no log of a rounded probability). The teacher is detached. Zero iff
    the two distributions are equal at every valid position; 0 when no position is valid.

    Args:
        student_logits_NV, teacher_logits_NV: [..., V] logits (any leading shape, the same for both).
        mask_N: [...] bool, True on positions that count (default: all).
        temperature: both distributions are softened by it; the result is scaled by temperature² so gradient
            magnitudes do not shrink with it (Hinton et al., 2015).
    """
    if student_logits_NV.shape != teacher_logits_NV.shape:
        raise ValueError(f"student logits {tuple(student_logits_NV.shape)} != teacher {tuple(teacher_logits_NV.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s_NV = F.log_softmax(student_logits_NV.float() / temperature, dim=-1)
    log_t_NV = F.log_softmax(teacher_logits_NV.detach().float() / temperature, dim=-1)
    kl_N = (log_s_NV.exp() * (log_s_NV - log_t_NV)).sum(-1)
    if mask_N is None:
        return kl_N.mean() * temperature**2
    if mask_N.shape != kl_N.shape:
        raise ValueError(f"mask shape {tuple(mask_N.shape)} != positions {tuple(kl_N.shape)}")
    weights_N = mask_N.to(kl_N.dtype)
    return (kl_N * weights_N).sum() / weights_N.sum().clamp(min=1.0) * temperature**2


class StudentView(NamedTuple):
    """A packed knowledge-in-context batch with its context tokens removed (see ``drop_context``).

    ids_BS / targets_BS: the student's inputs and next-token targets (IGNORE_INDEX where the next student token
    does not follow in the teacher's sequence, and on padding); teacher_pos_BS: for each student position, the
    teacher position holding the same token (0 on padding).
    """

    ids_BS: torch.Tensor
    targets_BS: torch.Tensor
    teacher_pos_BS: torch.Tensor


def drop_context(ids_BS: torch.Tensor, targets_BS: torch.Tensor, pad_id: int) -> StudentView:
    """The student's view of a packed knowledge-in-context batch: every supplied token removed.

    Token ``s >= 1`` of a row is supplied (context, or padding without loss) iff ``targets_BS[s - 1]`` is
    IGNORE_INDEX; token 0 is kept. The kept tokens, in order and left-aligned, are the student's row (padded
    with ``pad_id``). A student target is the next kept token where it is also the teacher's next token (inside
    one text); at a seam, where the teacher reads a context the student does not see, it is IGNORE_INDEX, and so
    are padding positions.

    Args:
        ids_BS, targets_BS: [B, S] a batch of ``data.PackedSequences`` with a loss mask.

    Returns:
        StudentView with [B, S] tensors.
    """
    if ids_BS.shape != targets_BS.shape or ids_BS.dim() != 2:
        raise ValueError(f"ids {tuple(ids_BS.shape)} and targets {tuple(targets_BS.shape)} must be the same [B, S]")
    batch, seq = ids_BS.shape
    keep_BS = torch.ones_like(ids_BS, dtype=torch.bool)
    keep_BS[:, 1:] = targets_BS[:, :-1] != IGNORE_INDEX
    student = torch.full_like(ids_BS, pad_id)
    targets = torch.full_like(targets_BS, IGNORE_INDEX)
    teacher_pos = torch.zeros_like(ids_BS)
    for b in range(batch):
        pos_K = keep_BS[b].nonzero().squeeze(1)
        count = pos_K.numel()
        student[b, :count] = ids_BS[b, pos_K]
        teacher_pos[b, :count] = pos_K
        follows_K = pos_K[1:] == pos_K[:-1] + 1  # the next kept token is the teacher's next token
        targets[b, : count - 1] = torch.where(follows_K, targets_BS[b, pos_K[:-1]], IGNORE_INDEX)
        if pos_K[-1] == seq - 1:  # the row's last token: its target (the next sequence's first) follows directly
            targets[b, count - 1] = targets_BS[b, seq - 1]
    return StudentView(student, targets, teacher_pos)


def distillation_loss(
    student_logits_BSV: torch.Tensor,
    teacher_logits_BSV: torch.Tensor,
    view: StudentView,
    kl_weight: float = 1.0,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce_weight * CE(student) + kl_weight * reverse KL(student || teacher)`` of a ``drop_context`` batch.

    The teacher's logits are taken at ``view.teacher_pos_BS``; both terms count the positions with a target.

    Args:
        student_logits_BSV: [B, S, V] the student's logits on ``view.ids_BS``.
        teacher_logits_BSV: [B, S, V] the teacher's logits on the packed batch ``view`` was made from.

    Returns:
        the loss and its detached parts ``{"ce", "reverse_kl"}``.
    """
    index_BSV = view.teacher_pos_BS.unsqueeze(-1).expand(*view.teacher_pos_BS.shape, teacher_logits_BSV.shape[-1])
    aligned_BSV = teacher_logits_BSV.gather(1, index_BSV)
    kl = reverse_kl(student_logits_BSV, aligned_BSV, view.targets_BS != IGNORE_INDEX, temperature)
    ce = lm_loss(student_logits_BSV, view.targets_BS)
    return ce_weight * ce + kl_weight * kl, {"ce": ce.detach(), "reverse_kl": kl.detach()}

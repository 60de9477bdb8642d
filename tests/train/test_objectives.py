"""Objectives: targets and loss masks, reverse KL against the direct formula, the distillation loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.train.config import ObjectiveConfig
from pure_reasoner.train.distill import distill_forward
from pure_reasoner.train.objectives import (
    IGNORE_INDEX,
    distillation_loss,
    drop_context,
    in_context_example,
    in_context_tokens,
    knowledge_off_loss,
    lm_loss,
    reverse_kl,
    shift_targets,
)


def _reverse_kl_direct(student, teacher, mask):
    """sum_v p_s log(p_s / p_t) per position with plain probabilities, averaged over masked positions."""
    total, count = 0.0, 0
    for n in range(student.shape[0]):
        if not mask[n]:
            continue
        p_s = torch.softmax(student[n].double(), -1)
        p_t = torch.softmax(teacher[n].double(), -1)
        total += sum(float(p_s[v] * math.log(p_s[v] / p_t[v])) for v in range(student.shape[1]))
        count += 1
    return total / max(count, 1)


def test_reverse_kl_matches_direct_formula():
    student, teacher = torch.randn(7, 11) * 2, torch.randn(7, 11) * 2
    mask = torch.tensor([True, False, True, True, False, True, True])
    got = reverse_kl(student, teacher, mask)
    assert float(got) == pytest.approx(_reverse_kl_direct(student, teacher, mask), rel=1e-5)
    # Masked positions do not count: change them arbitrarily.
    student2 = student.clone()
    student2[~mask] = torch.randn(int((~mask).sum()), 11) * 10
    assert float(reverse_kl(student2, teacher, mask)) == pytest.approx(float(got), rel=1e-6)
    # Reverse, not forward: swapping the arguments gives a different value.
    assert float(reverse_kl(teacher, student, mask)) != pytest.approx(float(got), rel=1e-3)
    # Temperature: softened distributions, scaled by T^2.
    assert float(reverse_kl(student, teacher, mask, temperature=2.0)) == pytest.approx(
        4 * _reverse_kl_direct(student / 2, teacher / 2, mask), rel=1e-5)


def test_reverse_kl_zero_iff_distributions_match():
    logits = torch.randn(5, 9)
    assert float(reverse_kl(logits, logits + 3.7)) == pytest.approx(0.0, abs=1e-6)  # same softmax
    perturbed = logits.clone()
    perturbed[2, 4] += 0.05
    assert float(reverse_kl(perturbed, logits)) > 1e-6
    assert float(reverse_kl(logits, perturbed, torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool))) == pytest.approx(
        0.0, abs=1e-6)
    assert float(reverse_kl(logits, perturbed, torch.zeros(5, dtype=torch.bool))) == 0.0


def test_reverse_kl_is_mode_seeking():
    """Teacher with two modes: a student on one mode beats a broad student in reverse KL, not in forward KL."""
    teacher = torch.log(torch.tensor([[0.495, 0.01, 0.495]]))
    one_mode = torch.log(torch.tensor([[0.98, 0.01, 0.01]]))
    broad = torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    assert reverse_kl(one_mode, teacher) < reverse_kl(broad, teacher)
    assert reverse_kl(teacher, one_mode) > reverse_kl(teacher, broad)  # forward KL prefers covering


def test_reverse_kl_gradient_only_to_student():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    reverse_kl(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0
    # Gradient of sum_v p log(p/q) w.r.t. student logits z: p * (log p - log q - KL) / N.
    p, log_p, log_q = torch.softmax(student, -1), torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    kl = (p * (log_p - log_q)).sum(-1, keepdim=True)
    torch.testing.assert_close(student.grad, (p * (log_p - log_q - kl) / 4).detach())


def test_in_context_masks_the_supplied_facts():
    context, text = [5, 6, 7], [1, 2, 3, 4]
    ids, mask = in_context_tokens(context, text)
    assert ids == [5, 6, 7, 1, 2, 3, 4] and mask == [False] * 3 + [True] * 4
    inputs, targets = in_context_example(context, text)
    assert inputs.tolist() == [5, 6, 7, 1, 2, 3]
    # Position 2 (last context token) predicts the first text token; no context token is a target.
    assert targets.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3, 4]
    inputs_BS, targets_BS = shift_targets(torch.tensor([ids, ids]), torch.tensor([mask, [True] * 7]))
    assert targets_BS.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3, 4], [6, 7, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="at least 2"):
        shift_targets(torch.tensor([3]))


def test_lm_loss_is_the_models_cross_entropy():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, reasoning_width=16,
                      knowledge=KnowledgeConfig(num_experts=2, expert_width=8, top_k=1))
    model = PureReasonerLM(cfg)
    inputs, targets = in_context_example([3, 4, 5], [6, 7, 8, 9])
    out = model(inputs[None], targets[None])
    torch.testing.assert_close(lm_loss(out.logits_BSV, targets[None]), out.loss - out.aux_loss)
    manual = F.cross_entropy(out.logits_BSV[0, 2:], targets[2:])
    torch.testing.assert_close(lm_loss(out.logits_BSV, targets[None]), manual)


def test_distillation_loss_reads_the_teacher_at_the_students_positions():
    """A teacher whose logits one-hot its input token: gathered at the student's positions they one-hot the
    student's inputs; a student equal to that has zero KL and its loss is its CE alone."""
    ids_BS = torch.tensor([[9, 9, 1, 2, 3, 4, 8, 5, 6, 7]])  # context 9 9 | text 1..4 | context 8 | text 5..7
    mask = torch.tensor([[False, False, True, True, True, True, False, True, True, True]])
    inputs_BS, targets_BS = shift_targets(ids_BS, mask)
    view = drop_context(inputs_BS, targets_BS, pad_id=0)
    assert view.ids_BS[0, :7].tolist() == [9, 1, 2, 3, 4, 5, 6]  # the first token, then every predicted one
    vocab = 10
    teacher_BSV = F.one_hot(inputs_BS, vocab).float() * 5
    aligned_BSV = teacher_BSV.gather(1, view.teacher_pos_BS.unsqueeze(-1).expand(-1, -1, vocab))
    assert aligned_BSV.argmax(-1)[0, :7].tolist() == [9, 1, 2, 3, 4, 5, 6]
    student_BSV = aligned_BSV.clone().requires_grad_()
    loss, parts = distillation_loss(student_BSV, teacher_BSV, view, kl_weight=2.0)
    assert float(parts["reverse_kl"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(loss, parts["ce"])
    expected_ce = F.cross_entropy(student_BSV[0], view.targets_BS[0], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(parts["ce"], expected_ce)
    _, parts = distillation_loss(torch.randn(1, 9, vocab), teacher_BSV, view)
    assert float(parts["reverse_kl"]) > 0.1


def test_distill_forward_trains_student_toward_teacher():
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, reasoning_width=16,
                      knowledge=KnowledgeConfig(num_experts=2, expert_width=8, top_k=1))
    teacher, student = PureReasonerLM(cfg).eval(), PureReasonerLM(cfg)
    ids, mask = in_context_tokens([1, 2, 3], [4, 5, 6, 7])
    more_ids, more_mask = in_context_tokens([2], [8, 9, 10])
    idx_BS, targets_BS = shift_targets(torch.tensor([ids + more_ids]), torch.tensor([mask + more_mask]))
    objective = ObjectiveConfig(kind="distill", teacher="unused", kl_weight=1.0, ce_weight=0.0)
    view = drop_context(idx_BS, targets_BS, pad_id=0)

    def kl() -> float:
        with torch.no_grad():
            return float(distillation_loss(student(view.ids_BS).logits_BSV, teacher(idx_BS).logits_BSV, view,
                                           ce_weight=0.0)[1]["reverse_kl"])

    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    before = kl()
    for _ in range(30):
        out = distill_forward(student, teacher, idx_BS, targets_BS, objective)
        assert len(out.stats) == 1
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert kl() < 0.5 * before


def test_knowledge_off_loss_hand_made():
    """forget = log V - H(p) on the forget positions; read = CE on the read positions; weights apply."""
    torch.manual_seed(0)
    vocab = 7
    logits_BSV = torch.randn(2, 5, vocab)
    logits_BSV[0, 1] = 0.0  # uniform there: contributes 0 to forget
    targets_BS = torch.randint(0, vocab, (2, 5))
    targets_BS[1, 4] = IGNORE_INDEX
    forget_BS = torch.zeros(2, 5, dtype=torch.bool)
    forget_BS[0, 1] = forget_BS[1, 2] = True
    read_BS = torch.zeros(2, 5, dtype=torch.bool)
    read_BS[0, 3] = read_BS[1, 0] = read_BS[1, 4] = True  # (1, 4) has no target: not counted
    loss, parts = knowledge_off_loss(logits_BSV, targets_BS, forget_BS, read_BS, 2.0, 0.5)
    p = torch.softmax(logits_BSV[1, 2].double(), -1)
    kl_uniform = sum(float(p[v] * math.log(p[v] * vocab)) for v in range(vocab))
    assert float(parts["forget"]) == pytest.approx(kl_uniform / 2, rel=1e-5)
    logp = torch.log_softmax(logits_BSV.double(), -1)
    read = -(logp[0, 3, targets_BS[0, 3]] + logp[1, 0, targets_BS[1, 0]]) / 2
    assert float(parts["read"]) == pytest.approx(float(read), rel=1e-5)
    assert float(loss) == pytest.approx(2.0 * float(parts["forget"]) + 0.5 * float(parts["read"]), rel=1e-6)
    # a confident prediction is far from uniform: forget approaches log V
    sharp_BSV = torch.full((1, 1, vocab), -30.0)
    sharp_BSV[0, 0, 3] = 30.0
    _, sharp = knowledge_off_loss(sharp_BSV, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                                  torch.zeros(1, 1, dtype=torch.bool), 1.0, 1.0)
    assert float(sharp["forget"]) == pytest.approx(math.log(vocab), rel=1e-4) and float(sharp["read"]) == 0.0


def test_knowledge_off_loss_gradient_pushes_toward_uniform():
    logits_BSV = torch.randn(1, 3, 11, requires_grad=True)
    mask_BS = torch.tensor([[True, False, True]])
    loss, _ = knowledge_off_loss(logits_BSV, torch.zeros(1, 3, dtype=torch.long), mask_BS, ~mask_BS, 1.0, 0.0)
    loss.backward()
    assert logits_BSV.grad[0, 1].abs().max() == 0  # neither forgotten nor read
    with torch.no_grad():
        stepped_BSV = logits_BSV - 0.5 * logits_BSV.grad
    entropy = lambda z: float(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum())  # noqa: E731
    assert entropy(stepped_BSV[0, 0]) > entropy(logits_BSV[0, 0].detach())


def test_knowledge_off_loss_rejects_bad_masks():
    logits_BSV, targets_BS = torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long)
    good = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="forget_BS"):
        knowledge_off_loss(logits_BSV, targets_BS, torch.ones(1, 4, dtype=torch.bool), good, 1.0, 1.0)
    with pytest.raises(ValueError, match="read_BS"):
        knowledge_off_loss(logits_BSV, targets_BS, good, good.long(), 1.0, 1.0)

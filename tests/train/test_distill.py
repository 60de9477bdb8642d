"""Mode-seeking distillation: the context-free student view, its loss, and ``objective=distill`` end to end."""

import pytest
import torch

from pure_reasoner.train.objectives import IGNORE_INDEX, distillation_loss, drop_context, reverse_kl
from tests.train.helpers import compose_config, metrics, run_in_process

IGN = IGNORE_INDEX


def test_drop_context_hand_made():
    # One packed row: text "1 2" | context "8 9" | text "3 4" | padding "0"; targets = next token, IGN where the
    # next token is supplied (context or padding).
    ids = torch.tensor([[1, 2, 8, 9, 3, 4, 0]])
    targets = torch.tensor([[2, IGN, IGN, 3, 4, IGN, IGN]])
    view = drop_context(ids, targets, pad_id=7)
    assert view.ids_BS.tolist() == [[1, 2, 3, 4, 7, 7, 7]]  # 8, 9 (context) and 0 (padding) dropped
    assert view.teacher_pos_BS.tolist() == [[0, 1, 4, 5, 0, 0, 0]]
    # 1 -> 2 follows; 2 -> 3 is a seam (the teacher reads the context in between); 3 -> 4 follows; 4 is last.
    assert view.targets_BS.tolist() == [[2, IGN, 4, IGN, IGN, IGN, IGN]]


def test_drop_context_keeps_a_row_without_context():
    ids, targets = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[6, 7, 8, 9]])
    view = drop_context(ids, targets, pad_id=0)
    assert torch.equal(view.ids_BS, ids) and torch.equal(view.targets_BS, targets)
    assert view.teacher_pos_BS.tolist() == [[0, 1, 2, 3]]


def test_packed_loss_is_ce_when_student_matches_teacher():
    ids = torch.tensor([[1, 2, 8, 9, 3, 4, 0]])
    targets = torch.tensor([[2, IGN, IGN, 3, 4, IGN, IGN]])
    view = drop_context(ids, targets, pad_id=0)
    teacher_BSV = torch.randn(1, 7, 11)
    student_BSV = teacher_BSV.gather(1, view.teacher_pos_BS.unsqueeze(-1).expand(1, 7, 11)).requires_grad_()
    loss, parts = distillation_loss(student_BSV, teacher_BSV, view, kl_weight=1.0, ce_weight=1.0)
    assert parts["reverse_kl"].abs() < 1e-6
    torch.testing.assert_close(loss, parts["ce"])
    other = torch.randn_like(student_BSV)
    _, parts = distillation_loss(other, teacher_BSV, view, kl_weight=1.0)
    aligned = teacher_BSV.gather(1, view.teacher_pos_BS.unsqueeze(-1).expand(1, 7, 11))
    torch.testing.assert_close(parts["reverse_kl"], reverse_kl(other, aligned, view.targets_BS != IGN))


def test_distill_needs_teacher_and_in_context_data():
    with pytest.raises(ValueError, match="objective.teacher"):
        compose_config("objective.kind=distill")
    with pytest.raises(ValueError, match="in_context_fraction"):
        compose_config("objective.kind=distill", "objective.teacher=somewhere")


WORLD = ("data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny", "data.seq_len=384",
         "model.max_seq_len=384", "data.max_chars=null")


def test_distill_run_end_to_end(tmp_path):
    """A teacher trained with knowledge in context, then a student distilled from it: the loss falls."""
    run_in_process(tmp_path / "teacher", *WORLD)
    summary = run_in_process(tmp_path / "student", *WORLD, "objective.kind=distill",
                             f"objective.teacher={tmp_path / 'teacher' / 'export'}")
    rows = metrics(tmp_path / "student")
    assert rows[-1]["loss"] < rows[0]["loss"] and summary.steps == 12
    tokenizers = [(tmp_path / run / "tokenizer.json").read_bytes() for run in ("student", "teacher")]
    assert tokenizers[0] == tokenizers[1]
    with pytest.raises(ValueError, match="vocab_size"):
        run_in_process(tmp_path / "wrong", *WORLD, "objective.kind=distill", "model.vocab_size=300",
                       f"objective.teacher={tmp_path / 'teacher' / 'export'}")

"""Runs that start from an export (train.init_from) and the recall anchor (objective.anchor_weight): what is
copied, what is refused before anything is written, and a relocation run end to end."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.moe.checkpoint import save_pretrained
from pure_reasoner.train.config import ObjectiveConfig
from pure_reasoner.train.distill import anchor_loss
from pure_reasoner.train.init_from import check_source, init_weights
from tests.train.helpers import RECIPE_RUN, compose_config, metrics, run_in_process

TINY = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, reasoning_width=48,
                   knowledge=KnowledgeConfig(num_experts=4, expert_width=24, top_k=2))


def test_init_weights_copies_every_parameter_and_controller_buffer(tmp_path):
    torch.manual_seed(0)
    trained = PureReasonerLM(TINY)
    for layer in trained.moe_layers():  # controller state a fresh init would not have
        layer.router.margin_threshold.fill_(0.37)
    save_pretrained(trained, tmp_path)
    torch.manual_seed(1)
    model = PureReasonerLM(TINY)
    init_weights(model, check_source(str(tmp_path), TINY, ep_size=1))
    saved = load_file(tmp_path / "model.safetensors")  # the file itself, not the loader, is the oracle
    state = model.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert all(float(layer.router.margin_threshold) == pytest.approx(0.37) for layer in model.moe_layers())


def test_init_from_refuses_other_configs_and_missing_dirs(tmp_path):
    save_pretrained(PureReasonerLM(TINY), tmp_path / "export")
    wider = ModelConfig(**{**TINY.__dict__, "d_model": 64})
    with pytest.raises(ValueError, match="another model config.*d_model"):
        check_source(str(tmp_path / "export"), wider, ep_size=1)
    with pytest.raises(ValueError, match="another model config.*knowledge.*'top_k': 1"):
        check_source(str(tmp_path / "export"), _knowledge(TINY, top_k=1), ep_size=1)
    with pytest.raises(ValueError, match="is not a directory"):
        check_source(str(tmp_path / "nowhere"), TINY, ep_size=1)
    with pytest.raises(ValueError, match="ep_size=1"):
        check_source(str(tmp_path / "export"), TINY, ep_size=2)


def _knowledge(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, knowledge=dataclasses.replace(cfg.knowledge, **changes))


def test_init_from_accepts_other_loss_coefficients(tmp_path):
    """A run may weight the router's losses differently from the run it starts from: the weights mean the same."""
    save_pretrained(PureReasonerLM(TINY), tmp_path / "export")
    other = _knowledge(TINY, consult_loss_coef=1.0, balance_loss_coef=0.5, z_loss_coef=0.0)
    source = check_source(str(tmp_path / "export"), other, ep_size=1)
    model = PureReasonerLM(other)
    init_weights(model, source)
    assert model.cfg.knowledge.consult_loss_coef == 1.0
    copied, saved = model.state_dict(), source.state_dict()
    assert all(torch.equal(copied[name], saved[name]) for name in saved)


@pytest.mark.parametrize("rows", [64, 4])
def test_init_from_resizes_the_reference_ring(tmp_path, rows):
    """A run may keep a longer (or shorter) reference ring than its source: the ring is refilled from the source's
    rows, every parameter and the threshold copied as they are."""
    torch.manual_seed(0)
    trained = PureReasonerLM(_knowledge(TINY, reference_tokens=16))
    for layer in trained.moe_layers():
        layer.router.reference_x_RD.normal_()
        layer.router.reference_next.fill_(5)
        layer.router.margin_threshold.fill_(0.37)
    save_pretrained(trained, tmp_path / "export")
    other = _knowledge(TINY, reference_tokens=rows)
    model = PureReasonerLM(other)
    init_weights(model, check_source(str(tmp_path / "export"), other, ep_size=1))
    saved, copied = load_file(tmp_path / "export" / "model.safetensors"), model.state_dict()
    for name, tensor in saved.items():
        if name.endswith("reference_x_RD"):  # 16 rows: each repeated 4 times (64), or every 4th row (4)
            expected = tensor.repeat_interleave(4, 0) if rows == 64 else tensor[::4]
            assert torch.equal(copied[name], expected), name
        elif name.endswith("reference_next"):
            assert int(copied[name]) == 0, name
        else:
            assert torch.equal(copied[name], tensor), name
    assert all(float(layer.router.margin_threshold) == pytest.approx(0.37) for layer in model.moe_layers())


def test_anchor_loss_is_the_reverse_kl_at_the_anchored_positions():
    torch.manual_seed(0)
    teacher = PureReasonerLM(TINY).eval()
    idx_BS = torch.randint(0, 50, (2, 16))
    anchor_BS = torch.zeros(2, 16, dtype=torch.bool)
    anchor_BS[0, 3] = anchor_BS[1, 9] = True
    obj = ObjectiveConfig(teacher="unused", anchor_weight=0.5)
    with torch.no_grad():
        same_BSV = teacher(idx_BS).logits_BSV
    assert float(anchor_loss(same_BSV, teacher, idx_BS, anchor_BS, obj)) == pytest.approx(0.0, abs=1e-6)
    student_BSV = same_BSV + torch.randn_like(same_BSV)
    expected = 0.0
    for b, s in ((0, 3), (1, 9)):  # KL(p_s || p_t) written out per anchored position
        p_s = torch.softmax(student_BSV[b, s].double(), -1)
        p_t = torch.softmax(same_BSV[b, s].double(), -1)
        expected += float((p_s * (p_s.log() - p_t.log())).sum()) / 2
    assert float(anchor_loss(student_BSV, teacher, idx_BS, anchor_BS, obj)) == pytest.approx(0.5 * expected, rel=1e-5)
    student_BSV[0, 4] += 100.0  # an unanchored position does not count
    assert float(anchor_loss(student_BSV, teacher, idx_BS, anchor_BS, obj)) == pytest.approx(0.5 * expected, rel=1e-5)


def test_anchor_config_errors():
    with pytest.raises(ValueError, match="anchor_weight=1.0 needs objective.kind=lm and objective.teacher"):
        ObjectiveConfig(anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_weight must be >= 0"):
        ObjectiveConfig(anchor_weight=-1.0, teacher="x")


def test_relocation_run_end_to_end(tmp_path):
    """Phase one trains; phase two starts from its export, anchored to it, with the forget pass on."""
    run_in_process(tmp_path / "first", base=RECIPE_RUN)
    export = tmp_path / "first" / "export"
    first = metrics(tmp_path / "first")
    # A config that differs from the export's fails before the run directory exists.
    with pytest.raises(ValueError, match="another model config"):
        run_in_process(tmp_path / "wider", f"train.init_from={export}", "model.d_model=96", base=RECIPE_RUN)
    assert not (tmp_path / "wider").exists()
    second_overrides = (f"train.init_from={export}", f"objective.teacher={export}", "objective.anchor_weight=1.0")
    run_in_process(tmp_path / "second", *second_overrides, base=RECIPE_RUN)
    second = metrics(tmp_path / "second")
    # It starts where the first run ended, not from a fresh init (whose first loss is ~log V): its first loss sits
    # nearer the first run's last than its first.
    drop = first[0]["ce"] - first[-1]["ce"]
    assert drop > 0.3
    assert abs(second[0]["ce"] - first[-1]["ce"]) < 0.5 * drop
    # Its logged FLOPs add the teacher's forward to the model's and the forget pass's (the controller, carried over
    # from the first run, holds the rate near its target: a step's figure moves ~3% with it).
    from pure_reasoner.moe import flops
    from pure_reasoner.train.objectives import forget_pass_flops

    cfg = compose_config(*RECIPE_RUN, *second_overrides)
    seq = cfg.data.seq_len
    teacher = flops.nominal(cfg.model, seq).inference_flops_per_token
    expected = flops.nominal(cfg.model, seq).flops_per_token + forget_pass_flops(cfg.model, cfg.objective, seq)
    assert teacher > 0.15 * expected  # leaving it out would fail the check below
    assert [row["flops_per_token"] for row in second] == pytest.approx([expected + teacher] * len(second), rel=0.06)


def test_doc_mask_run_end_to_end(tmp_path):
    """data.doc_mask trains (forget pass included: decoupling_smoke has it) and its loss goes down."""
    run_in_process(tmp_path / "run", "data.doc_mask=true", base=RECIPE_RUN)
    rows = metrics(tmp_path / "run")
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3
    with pytest.raises(ValueError, match="does not support data.doc_mask"):
        compose_config(*RECIPE_RUN, "data.doc_mask=true", "objective.kind=distill", "objective.teacher=x",
                       "objective.forget_weight=0", "objective.read_weight=0", "objective.route_knowledge=false")

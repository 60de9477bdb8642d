"""The accountant against direct parameter counts, published figures, and realized routing."""

import json

import pytest
import torch

from moe import PRESET_NAMES, PureReasonerLM, preset
from moe.flops import knowledge_off, main, nominal, realized

# (total, active) from the model cards / papers, in billions.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),
    "olmoe-1b-7b": (6.9, 1.3),
    "qwen1.5-moe-a2.7b": (14.3, 2.7),
    "deepseek-moe-16b": (16.4, 2.8),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_total_params_equal_an_instantiated_model(name):
    cfg = preset(name)
    with torch.device("meta"):  # shapes only: Mixtral's 46.7B parameters cost nothing here
        model = PureReasonerLM(cfg)
    assert nominal(cfg).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_figures(name):
    report = nominal(preset(name))
    total, active = PUBLISHED[name]
    assert report.total_params / 1e9 == pytest.approx(total, rel=0.02)
    assert report.active_params / 1e9 == pytest.approx(active, rel=0.03)


def test_realized_follows_routing():
    cfg = preset("tiny")
    model = PureReasonerLM(cfg)
    idx_BS = torch.randint(0, cfg.vocab_size, (2, 64))
    out = model(idx_BS)
    rep = realized(cfg, out.stats, seq_len=64)
    one_expert = 3 * cfg.d_model * cfg.knowledge.expert_width
    base = realized(cfg, model(idx_BS, knowledge_off=True).stats, seq_len=64)
    expected_extra = sum(float(s.expert_load_E.sum()) / 128 for s in out.stats) * one_expert
    assert expected_extra > 0
    assert rep.active_params - base.active_params == pytest.approx(expected_extra)
    assert rep.flops_per_token - base.flops_per_token == pytest.approx(6 * expected_extra)
    per_block_extra = [a - b for a, b in zip(rep.block_active_params, base.block_active_params, strict=True)]
    for extra, s in zip(per_block_extra, out.stats, strict=True):  # every tiny block is a MoE block
        assert extra == pytest.approx(float(s.expert_load_E.sum()) / 128 * one_expert)
    embed_and_head = rep.flops_per_token - sum(rep.block_flops_per_token)
    assert embed_and_head == pytest.approx(6 * cfg.vocab_size * cfg.d_model)  # the LM-head matmul


def test_knowledge_off_is_what_a_pass_without_consults_realizes():
    cfg = preset("tiny")
    model = PureReasonerLM(cfg)
    idle = realized(cfg, model(torch.randint(0, cfg.vocab_size, (2, 64)), knowledge_off=True).stats, seq_len=64)
    off = knowledge_off(cfg, 64)
    assert off.flops_per_token == idle.flops_per_token and off.active_params == idle.active_params
    one_expert = 3 * cfg.d_model * cfg.knowledge.expert_width
    routed = cfg.knowledge.consult_rate * cfg.knowledge.top_k * cfg.n_layers  # every tiny block is a MoE block
    assert nominal(cfg, 64).flops_per_token - off.flops_per_token == pytest.approx(6 * routed * one_expert)


def test_realized_equals_nominal_when_every_token_consults():
    cfg = preset("olmoe-1b-7b")
    cfg.n_layers, cfg.vocab_size, cfg.d_model, cfg.knowledge.expert_width = 2, 100, 64, 32
    model = PureReasonerLM(cfg)
    out = model(torch.randint(0, 100, (1, 16)))
    assert realized(cfg, out.stats, 16).active_params == nominal(cfg, 16).active_params


def test_training_flops_are_three_times_inference_for_matmuls():
    rep = nominal(preset("small"))
    assert rep.flops_per_token - rep.attention_flops_per_token == pytest.approx(3 * (
        rep.inference_flops_per_token - rep.attention_flops_per_token / 3))


def test_cli_json(capsys):
    main(["--preset", "mixtral-8x7b", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "flops_per_token"} <= report.keys()
    assert report["preset"] == "mixtral-8x7b"


def test_cli_rejects_unknown_preset():
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "gpt-5"])
    assert exc.value.code != 0

"""The accountant against direct parameter counts, published figures, and realized routing (FLOPs against
PyTorch's FLOP counter: test_flops_counter.py)."""

import json

import pytest
import torch

from pure_reasoner.moe import PRESET_NAMES, PureReasonerLM, preset
from pure_reasoner.moe.flops import knowledge_off, main, nominal, realized

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


def test_active_params_follow_the_routing_and_the_modules_that_ran():
    """Active parameters from the model's own tensors: what a pass with knowledge off touches (no router), and
    what each routed row adds (one expert's three matrices)."""
    cfg = preset("tiny")
    model = PureReasonerLM(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 64)))
    layers = model.moe_layers()
    routers = sum(p.numel() for layer in layers for p in layer.router.parameters())
    experts = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    everything = sum(p.numel() for p in model.parameters())
    off = knowledge_off(cfg, 64)
    assert off.active_params == everything - routers - experts
    per_expert = experts / (len(layers) * cfg.knowledge.num_experts)
    rows_per_token = [float(s.expert_load_E.sum()) / 128 for s in out.stats]
    assert all(rows > 0 for rows in rows_per_token)
    rep = realized(cfg, out.stats, seq_len=64)
    assert rep.active_params == pytest.approx(off.active_params + routers + sum(rows_per_token) * per_expert)


def test_realized_equals_nominal_when_every_token_consults():
    cfg = preset("olmoe-1b-7b")
    cfg.n_layers, cfg.vocab_size, cfg.d_model, cfg.knowledge.expert_width = 2, 100, 64, 32
    model = PureReasonerLM(cfg)
    out = model(torch.randint(0, 100, (1, 16)))
    assert realized(cfg, out.stats, 16).active_params == nominal(cfg, 16).active_params


def test_cli_json(capsys):
    main(["--preset", "mixtral-8x7b", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "flops_per_token"} <= report.keys()
    assert report["preset"] == "mixtral-8x7b"


def test_cli_rejects_unknown_preset():
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "gpt-5"])
    assert exc.value.code != 0

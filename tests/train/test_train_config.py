"""Every option of every config group composes, validates and builds its model; bad keys fail clearly."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pure_reasoner.moe import PureReasonerLM, reasoning_off
from pure_reasoner.train.baselines import DeepSpeedResidualFFN
from pure_reasoner.train.build_model import build_model
from pure_reasoner.train.config import MODEL_PRESETS, register_configs
from tests.train.helpers import CONF, compose_config, compose_raw, run_in_process


def _options(group: str) -> list[str]:
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    return names + (list(MODEL_PRESETS) if group == "model" else [])


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_builds(model, dist_info):
    cfg = compose_config(f"model={model}")
    on_meta = model == "base"  # 400M parameters: build it without allocating them
    with torch.device("meta" if on_meta else "cpu"):
        lm = build_model(cfg)
    assert isinstance(lm, PureReasonerLM)
    assert lm.cfg == cfg.model
    if on_meta:
        return
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = lm(idx, idx)
    assert torch.isfinite(out.loss)
    assert len(out.stats) == sum(b.is_moe for b in lm.blocks)


def test_baselines_are_what_they_say():
    dense = compose_config("model=dense").model
    assert not any(dense.is_moe_layer(i) for i in range(dense.n_layers)) and dense.dense_width == dense.reasoning_width
    topk = compose_config("model=topk_moe").model
    assert topk.reasoning_width is None and topk.knowledge.mechanism == "always"
    shared = compose_config("model=shared_moe").model
    assert shared.reasoning_width and shared.knowledge.mechanism == "always"
    residual = compose_config("model=residual_moe")
    assert residual.ffn == "deepspeed_residual" and residual.model.d_model == compose_config().model.d_model


def test_residual_moe_uses_deepspeed(dist_info):
    from deepspeed.moe.layer import MoE

    lm = build_model(compose_config("model=residual_moe", "model.n_layers=1"))
    ffn = lm.blocks[0].ffn
    assert isinstance(ffn, DeepSpeedResidualFFN) and isinstance(ffn.moe, MoE) and ffn.moe.use_residual
    out = lm(torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8)))
    out.loss.backward()
    assert float(out.stats[0].expert_load_E.sum()) == 2 * 8 * lm.cfg.knowledge.top_k  # dropless top-2
    assert ffn.moe.mlp.w1.weight.grad is not None


def test_residual_moe_ablations_split_its_two_terms(dist_info):
    lm = build_model(compose_config("model=residual_moe", "model.n_layers=1"))
    ffn = lm.blocks[0].ffn
    for _, param in ffn.named_parameters():
        torch.nn.init.normal_(param, std=0.3)  # large enough that both terms show
    x_TD = torch.randn(16, lm.cfg.d_model)
    full, _ = ffn(x_TD)
    torch.testing.assert_close(ffn(x_TD)[0], full, rtol=0, atol=0)  # deterministic (no sampled 2nd expert)
    no_knowledge, stats = ffn(x_TD, knowledge_off=True)
    with reasoning_off(lm):
        no_reasoning, _ = ffn(x_TD)
        both, _ = ffn(x_TD, knowledge_off=True)
    # DeepSpeed's y = c0 * moe(x) + c1 * mlp(x): each ablation removes one term, both remove everything
    torch.testing.assert_close(no_knowledge + no_reasoning, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(no_knowledge, full, atol=1e-3) and not torch.allclose(no_reasoning, full, atol=1e-3)
    assert not both.any() and float(stats.consulting_tokens) == 0.0
    assert sum(p.numel() for p in ffn.experts.parameters()) == sum(
        p.numel() for p in ffn.moe.deepspeed_moe.experts.parameters()
    )


def test_residual_moe_run_exports_and_evaluates(tmp_path, dist_info):
    from pure_reasoner.moe.checkpoint import load_pretrained
    from pure_reasoner.train.evaluation.evaluate import load

    run_in_process(tmp_path / "run", "data=world", "data.in_context_fraction=0.5", "+data.generator_kwargs.preset=tiny",
                   "data.seq_len=384", "model.max_seq_len=384", "data.max_chars=null", "model=tiny_residual_moe")
    export = tmp_path / "run" / "export"
    with pytest.raises(ValueError, match="baseline"):
        load_pretrained(export)
    model, codec = load(export)
    assert isinstance(model.blocks[0].ffn, DeepSpeedResidualFFN)
    fresh = build_model(compose_config("model=tiny_residual_moe", "model.max_seq_len=384"))
    trained, initial = model.state_dict(), fresh.state_dict()
    assert trained.keys() == initial.keys()
    assert not torch.equal(trained["blocks.0.ffn.moe.mlp.w1.weight"], initial["blocks.0.ffn.moe.mlp.w1.weight"])
    experts = [k for k in trained if ".deepspeed_experts." in k]
    assert experts and any(not torch.equal(trained[k], initial[k]) for k in experts)  # the trained experts, exported
    idx_BS = torch.tensor([codec.encode("Q: Where was")])
    base = model(idx_BS).logits_BSV
    assert not torch.allclose(model(idx_BS, knowledge_off=True).logits_BSV, base)


@pytest.mark.parametrize("group", ["data", "train", "deepspeed", "experiment"])
def test_every_option_composes(group):
    needs = {"data=files": ["data.files=[corpus.jsonl]"],  # checked for existence when loaded, not here
             "data=world_dir": ["data.path=world"],
             # its name interpolates ${hydra:runtime.choices.model}, which resolves only under a real Hydra run
             "experiment=decoupling": ["name=decoupling"], "experiment=decoupling_tiny": ["name=decoupling_tiny"]}
    for option in _options(group):
        cfg = compose_config(f"{group}={option}", *needs.get(f"{group}={option}", []))
        assert cfg.model.vocab_size > 0


def test_bare_command_runs_the_first_run():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        bare = OmegaConf.to_object(compose("config", overrides=[]))
    first_run = compose_config("experiment=first_run")
    assert bare == first_run and bare.name == "first_run" and bare.objective.relocates
    assert bare.train.first_look > 0  # it ends with the knowledge on / off table
    plain = compose_config("experiment=plain")
    assert plain.name == "default" and plain.objective.relocate_at is None and plain.model.d_model != bare.model.d_model


def test_deepspeed_options_combine():
    cfg = compose_config("deepspeed=[zero2,bf16]")
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (2, "bf16")


def test_zero_communication_settings_reach_the_engine(dist_info):
    """DeepSpeed's own accessors read back what ``deepspeed.*`` set (its defaults otherwise)."""
    from pure_reasoner.moe import PureReasonerLM
    from pure_reasoner.train.engine import build_engine

    cfg = compose_config("experiment=smoke", "deepspeed=zero2", "deepspeed.overlap_comm=true",
                         "deepspeed.reduce_bucket_size=123456", "deepspeed.allgather_bucket_size=654322",
                         "deepspeed.contiguous_gradients=false")
    engine, _ = build_engine(cfg, PureReasonerLM(cfg.model), 1)
    assert (engine.zero_optimization_stage(), engine.zero_overlap_comm(), engine.zero_reduce_bucket_size(),
            engine.zero_allgather_bucket_size(), engine.zero_contiguous_gradients()) == (2, True, 123456, 654322, False)
    assert engine.zero_reduce_scatter() and engine.communication_data_type == torch.float32  # DeepSpeed's defaults
    cfg = compose_config("experiment=smoke", "deepspeed=zero2", "deepspeed.reduce_scatter=false",
                         "deepspeed.communication_data_type=bf16")
    engine, _ = build_engine(cfg, PureReasonerLM(cfg.model), 1)
    assert (engine.zero_reduce_scatter(), engine.communication_data_type) == (False, torch.bfloat16)
    assert engine.optimizer.communication_data_type == torch.bfloat16  # what ZeRO reduces in


@pytest.mark.parametrize("override, match", [
    ("deepspeed.communication_data_type=int8", "communication_data_type"),
    ("deepspeed.reduce_scatter=false", "reduce_scatter=false with train.ep_size=2"),
])
def test_bad_communication_settings_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        compose_config("experiment=smoke", "deepspeed=zero2", "train.ep_size=2", override)


def test_override_path_and_experiment_deltas():
    cfg = compose_config("experiment=smoke", "model.knowledge.consult_rate=0.05")
    assert cfg.model.knowledge.consult_rate == 0.05
    assert cfg.name == "smoke" and cfg.model.d_model == compose_config("model=tiny").model.d_model


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.knowledge.bogus=1", "bogus"),
        ("train.max_stepz=3", "max_stepz"),
        ("train.max_steps=many", "max_steps"),
        ("model.d_model=1.5", "d_model"),
        ("model=huge", "huge"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose(override, match):
    with pytest.raises(ConfigCompositionException) as err:
        compose_raw(override)
    assert match in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.seq_len=0", "data.seq_len must be > 0, got 0"),
        ("data.seq_len=-5", "data.seq_len must be > 0, got -5"),
        ("data.seq_len=4096", "exceeds model.max_seq_len"),
        ("deepspeed.zero_stage=3", "zero_stage must be 0, 1 or 2, got 3"),
        ("deepspeed=[zero0,bf16]", "zero_stage=0 trains in fp32 only, got deepspeed.precision='bf16'"),
        ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size must be an int > 0 \\(elements\\), got 0"),
        ("deepspeed.allgather_bucket_size=1001", "deepspeed.allgather_bucket_size must be even, got 1001"),
        ("model.knowledge.consult_rate=1.5", "consult_rate must be in"),
        ("train.ep_size=3", "not divisible by train.ep_size=3"),
        ("data=files", "data.files must list at least one file"),
        ("train.on_nonfinite=ignore", "on_nonfinite must be one of"),
    ],
)
def test_bad_values_fail_validation(override, match):
    with pytest.raises(ValueError, match=match):
        compose_config(override)

"""experiment=decoupling(_tiny): every model composes, fits a context row, matches the reasoner's active FLOPs."""

import pytest

from pure_reasoner.moe import flops
from tests.train.helpers import compose_config

MODELS = ("tiny_reasoner", "tiny_dense", "tiny_topk_moe", "tiny_shared_moe", "tiny_residual_moe")


@pytest.mark.parametrize("experiment", ["decoupling", "decoupling_tiny"])
def test_models_at_equal_active_flops(experiment):
    # name= given: the experiment's ${hydra:runtime.choices.model} resolves only under a real Hydra run
    cfgs = {m: compose_config(f"experiment={experiment}", f"model={m}", f"name={m}") for m in MODELS}
    reference = flops.nominal(cfgs["tiny_reasoner"].model, cfgs["tiny_reasoner"].data.seq_len).flops_per_token
    for cfg in cfgs.values():
        assert cfg.data.in_context_fraction == 0.5 and cfg.data.seq_len <= cfg.model.max_seq_len
        assert (cfg.data, cfg.train) == (cfgs["tiny_reasoner"].data, cfgs["tiny_reasoner"].train)  # same data, seed
        assert flops.nominal(cfg.model, cfg.data.seq_len).flops_per_token == pytest.approx(reference, rel=0.01)
    assert cfgs["tiny_dense"].model.dense_first_layers == cfgs["tiny_dense"].model.n_layers
    assert cfgs["tiny_topk_moe"].model.reasoning_width is None
    assert cfgs["tiny_shared_moe"].model.knowledge.mechanism == "always"
    assert cfgs["tiny_residual_moe"].ffn == "deepspeed_residual"
    assert cfgs["tiny_residual_moe"].model.reasoning_width == cfgs["tiny_residual_moe"].model.knowledge.expert_width

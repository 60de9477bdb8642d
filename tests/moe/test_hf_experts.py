"""Our knowledge path as transformers' experts implementation: on small random stock HF MoE models (Qwen2-MoE,
Qwen3-MoE, OLMoE, Mixtral), ``set_experts_implementation("pure_reasoner")`` gives eager's logits and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")

import pure_reasoner.moe.hf  # noqa: E402,F401  registers the experts implementations
from pure_reasoner.moe import hf_experts as moe_hf_experts  # noqa: E402

# (rtol, atol as a share of the reference's largest magnitude) per dtype. bf16: both sides round every matmul
# to 8 bits of mantissa, in different orders (measured: up to 0.6% of the logits, 1.8% of a gradient's max).
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 3e-2)}
COMMON = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, hidden_act="silu")


def _config(arch: str):
    import transformers as tf

    if arch == "qwen2_moe":  # shared expert + routed experts
        return tf.Qwen2MoeConfig(**COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                 num_experts=6, num_experts_per_tok=2, intermediate_size=64)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
                                 intermediate_size=64, head_dim=12, norm_topk_prob=True)
    if arch == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=5, num_experts_per_tok=2)
    return tf.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)


def _model(arch: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _config(arch)
    if dtype == torch.bfloat16:
        # One MoE layer: a bf16 rounding difference in one layer's output can flip a near-tie top-k choice in the
        # next, a jump no tolerance should absorb.
        cfg.num_hidden_layers = 1
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").to(dtype)
    with torch.no_grad():
        # transformers' init (std 0.02) leaves routers near uniform and the experts' share of the logits within
        # bf16's tolerance; larger weights make top-k and every expert weight matter.
        for name, param in model.named_parameters():
            if "gate" in name and "proj" not in name:
                param.normal_(std=0.5)
            elif "experts" in name or "lm_head" in name:
                param.normal_(std=0.2)
    return model


def _run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def calls(monkeypatch):
    """Counts the knowledge_mlp calls the experts implementation makes (proof that it ran, not eager)."""
    count = {"n": 0, "impl": set()}
    real = moe_hf_experts.knowledge_mlp

    def counted(*args, **kwargs):
        count["n"] += 1
        count["impl"].add(kwargs["impl"])
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_hf_experts, "knowledge_mlp", counted)
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"])
def test_outputs_and_gradients_equal_eager(arch, dtype, calls):
    model = _model(arch, dtype)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))  # T = 46 tokens, odd
    ref_logits, ref_grads = _run(model, ids, ids)
    assert calls["n"] == 0
    model.set_experts_implementation("pure_reasoner")
    assert model.config._experts_implementation == "pure_reasoner"
    logits, grads = _run(model, ids, ids)
    # one MoE block per layer, on CPU the torch path
    assert calls["n"] == model.config.num_hidden_layers and calls["impl"] == {"torch"}
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads and all(ref_grads[n].abs().sum() > 0 for n in expert_grads)
    rtol, share = TOLERANCE[dtype]
    pairs = {"logits": (logits, ref_logits), **{n: (g, ref_grads[n]) for n, g in grads.items()}}
    for name, (got, want) in pairs.items():  # expert weights, routers (through the top-k weights), all below
        got, want = got.float(), want.float()
        torch.testing.assert_close(got, want, rtol=rtol, atol=share * float(want.abs().max()), msg=name)


def test_triton_path_equals_eager(calls):
    """The CUDA default, here under Triton's CPU interpreter (fp32: the interpreter's bf16 dot is wrong)."""
    model = _model("olmoe", torch.float32)
    ids = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grads = _run(model, ids, ids)
    model.set_experts_implementation("pure_reasoner_triton")
    logits, grads = _run(model, ids, ids)
    assert calls["impl"] == {"triton"}
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_expert_parallel_sentinel_ids_are_skipped():
    """ids >= E (expert parallelism's slots for other ranks) contribute nothing, as in transformers' grouped_mm."""
    model = _model("mixtral", torch.float32)
    experts = model.model.layers[0].mlp.experts
    x_TD = torch.randn(9, 48)
    ids_TK = torch.randint(0, 4, (9, 2))
    weights_TK = torch.rand(9, 2)
    dropped_TK = ids_TK.clone()
    dropped_TK[::2, 1] = 4  # a sentinel
    kept_TK = torch.where(dropped_TK == 4, 0.0, weights_TK)
    got = moe_hf_experts.experts_forward(experts, x_TD, dropped_TK, weights_TK)
    with torch.no_grad():  # eager, written out per token
        want = torch.zeros_like(x_TD)
        for t in range(9):
            for k in range(2):
                e = int(ids_TK[t, k])
                gate, up = (experts.gate_up_proj[e] @ x_TD[t]).chunk(2)
                want[t] += kept_TK[t, k] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unsupported_experts_raise():
    import transformers as tf

    cfg = tf.MixtralConfig(**{**COMMON, "hidden_act": "gelu"}, intermediate_size=24, num_local_experts=4)
    model = tf.AutoModelForCausalLM.from_config(cfg, experts_implementation="pure_reasoner")
    with pytest.raises(ValueError, match="act_fn GELUActivation"):
        model(torch.zeros(1, 3, dtype=torch.long))

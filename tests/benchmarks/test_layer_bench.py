"""The layer benchmark: exact consult rates, FLOP accounting checked by PyTorch's counter, a smoke run."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pure_reasoner.benchmarks import layer, peers
from pure_reasoner.benchmarks.common import custom_op_flop_formulas

SHAPES = peers.Shapes("test", tokens=64, d_model=32, reasoning_width=48, expert_width=40, num_experts=8, top_k=2)


def _grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
    """FlopCounterMode has no formula for grouped_mm: every row of x meets one [I, O] weight."""
    return 2 * x_shape[0] * w_shape[-2] * w_shape[-1]


def _counted_matmul_flops(fn) -> int:
    counts = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten._grouped_mm,
              # the torch path's custom ops (benchmarks.common gives their FLOP formulas)
              torch.ops.pure_reasoner.torch_knowledge_mlp, torch.ops.pure_reasoner.torch_knowledge_mlp_bwd,
              torch.ops.pure_reasoner.cpu_linear, torch.ops.pure_reasoner.cpu_linear_bwd}
    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops, **custom_op_flop_formulas()}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    # DeepSpeed's gate also runs a [T,1,E] x [T,E,1] bmm per slot: elementwise work, not counted by us.
    return sum(v for k, v in fc.get_flop_counts()["Global"].items() if k in counts)


@pytest.mark.parametrize("rate", layer.RATES)
def test_consult_rate_is_exact(rate):
    x_TD = torch.randn(SHAPES.tokens, SHAPES.d_model)
    p = peers.ours("ours", peers.build_ours(SHAPES), SHAPES, x_TD, rate)
    assert p.consult_rate == round(rate * SHAPES.tokens) / SHAPES.tokens
    assert p.routed_rows == round(rate * SHAPES.tokens) * SHAPES.top_k
    _, stats = p.module(x_TD)  # the call sets the bias; a plain forward afterwards sees the same rate
    assert float(stats.consult_rate) == p.consult_rate


def test_realized_flops_match_pytorch_counter():
    """Forward FLOPs of every provider, and fwd+bwd = 3x forward, as counted op by op."""
    x_TD = torch.randn(SHAPES.tokens, SHAPES.d_model)
    ours_layer = peers.build_ours(SHAPES)
    providers = [peers.ours("ours", ours_layer, SHAPES, x_TD, r) for r in (0.0, 0.25, 1.0)]
    providers += [peers.reasoning_alone(SHAPES), peers.dense(SHAPES, 0.25), peers.qwen2_moe(SHAPES, x_TD),
                  peers.deepspeed_moe(SHAPES, x_TD)]
    x_grad_TD = x_TD.clone().requires_grad_()
    for p in providers:
        assert _counted_matmul_flops(lambda p=p: p.call(x_TD)) == p.fwd_flops, p.name
        counted = _counted_matmul_flops(lambda p=p: p.call(x_grad_TD).backward(torch.ones_like(x_TD)))
        assert counted == p.mode_flops("fwd+bwd"), p.name
        if p.routed_rows > 0 or p.name != "ours":
            assert counted == layer.FLOPS_PER_FWD["fwd+bwd"] * p.fwd_flops, p.name
        else:  # nothing routed: no router backward, so less than 3x the forward
            assert counted < layer.FLOPS_PER_FWD["fwd+bwd"] * p.fwd_flops, p.name


def test_peers_have_equal_total_params():
    """Up to their routers, every MoE provider holds F_r + E experts of F_k."""
    x_TD = torch.randn(SHAPES.tokens, SHAPES.d_model)
    ffn = 3 * SHAPES.d_model * (SHAPES.reasoning_width + SHAPES.num_experts * SHAPES.expert_width)
    router_bound = SHAPES.d_model * (SHAPES.num_experts + 2) + 2
    for p in (peers.ours("ours", peers.build_ours(SHAPES), SHAPES, x_TD, 0.5), peers.qwen2_moe(SHAPES, x_TD),
              peers.deepspeed_moe(SHAPES, x_TD)):
        assert 0 < p.total_params - ffn <= router_bound, (p.name, p.total_params - ffn)


def test_peers_are_initialised():
    """transformers leaves Qwen2-MoE's tensors empty and DeepSpeed copies one expert E times."""
    x_TD = torch.randn(SHAPES.tokens, SHAPES.d_model)
    qwen = peers.qwen2_moe(SHAPES, x_TD).module
    assert float(qwen.gate.weight.std()) == pytest.approx(peers.INIT_STD, rel=0.2)
    assert torch.isfinite(qwen.experts.gate_up_proj).all()
    ds = peers.deepspeed_moe(SHAPES, x_TD).module
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0].w1.weight, experts[1].w1.weight)


def test_quick_run_writes_every_record(tmp_path):
    json_path, plot_path = tmp_path / "layer.json", tmp_path / "layer.png"
    assert layer.main(["--quick", "--json", str(json_path), "--plot", str(plot_path)]) == 0
    out = json.loads(json_path.read_text())
    records = out["records"]
    required = {"provider", "consult_rate", "mode", "tokens", "time_s", "tokens_per_s", "gflops_per_s",
                "peak_fraction", "roofline_s", "engine"}
    assert all(required <= set(r) for r in records)
    chosen = out["machine"]["gemm_engines"]  # kernels.engines' choice on this machine, named per provider
    engines = {r["provider"]: r["engine"] for r in records}
    assert engines["qwen2moe"] == "linear mkl (nn.Linear); experts grouped_mm"
    assert engines["ours"].startswith(f"linear {chosen['dense']}; experts ") and out["machine"]["cpu_model"]
    assert all(r["time_s"] > 0 and r["roofline_s"] > 0 and r["gflops_per_s"] > 0 for r in records)
    for case, (modes, _, _) in layer.QUICK_PLAN.items():
        for mode in modes:
            got = {(r["provider"], r["consult_rate"]) for r in records if (r["case"], r["mode"]) == (case, mode)}
            tokens = layer.QUICK[case].tokens
            assert {("ours", round(rate * tokens) / tokens) for rate in layer.RATES} <= got, (case, mode)
            assert {"reasoning", "dense", "qwen2moe", "deepspeed"} <= {name for name, _ in got}, (case, mode)
    small = {r["provider"] for r in records if r["case"] == "small"}
    assert {"oracle", "qwen2moe-eager"} <= small
    assert all("activation_bytes" in r for r in records if r["mode"] == "fwd+bwd")
    for case, (modes, _, _) in layer.QUICK_PLAN.items():  # where both passes ran, fwd+bwd has their bound
        both = [r for r in records if (r["case"], r["mode"]) == (case, "fwd+bwd")]
        if {"fwd", "bwd"} <= set(modes):
            assert all(r["pass_bound_s"] >= r["roofline_s"] * (1 - 1e-12) for r in both), case
    assert {t["target"] for t in out["targets"]} >= {"ours <= 1.5x roofline", "rate 0 <= 1.10x reasoning alone"}
    assert plot_path.stat().st_size > 0


def test_unknown_case_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        layer.main(["--quick", "--cases", "default,nope"])
    assert exc.value.code != 0
    assert "nope" in capsys.readouterr().err

"""moe.flops against PyTorch's FLOP counter on a whole PureReasonerLM forward and backward.

The counter (``torch.utils.flop_counter.FlopCounterMode``) counts every matmul the pass dispatches; our custom
ops and the CPU attention kernel are opaque to it, so their formulas are registered here from the ops' own
inputs: the routed rows of the knowledge MLP, the GEMM shapes, the query/key/value shapes. Nothing is taken
from ``moe.flops``. Passes: an ordinary training step (nominal and realized), the knowledge-off pass and the
knowledge-mean pass (the forget pass's two ablations), on every mechanism.
"""

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.moe import flops, knowledge_mean
from tests.moe.flop_count import CPU_ATTENTION, CPU_ATTENTION_BWD, SEQ, counted, exact_rate, small_model

BATCH = 3
TOKENS = BATCH * SEQ


def _batch():
    return torch.randint(0, 40, (BATCH, SEQ)), torch.randint(0, 40, (BATCH, SEQ))


def _train_step(model, idx_BS, targets_BS, **ablation):
    out = model(idx_BS, targets_BS, **ablation)
    out.loss.backward()
    return out


def _assert_per_token(counts: dict, expected: float) -> None:
    """The counted FLOPs of the pass, per token, within 1% of the accountant's."""
    assert sum(counts.values()) / TOKENS == pytest.approx(expected, rel=0.01)


def _routed_share(out) -> list[float]:
    return [float(s.expert_load_E.sum()) / s.num_slots for s in out.stats]


MECHANISMS = ["gate", "null", "always"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_nominal_is_what_a_step_at_the_target_rate_costs(mechanism, monkeypatch):
    model = small_model(mechanism)
    exact_rate(model, monkeypatch)
    idx_BS, targets_BS = _batch()
    counts = counted(lambda: _train_step(model, idx_BS, targets_BS))
    assert {str(CPU_ATTENTION), str(CPU_ATTENTION_BWD), "pure_reasoner.torch_knowledge_mlp_bwd"} <= set(counts)
    _assert_per_token(counts, flops.nominal(model.cfg, SEQ).flops_per_token)
    with torch.no_grad():
        counts = counted(lambda: model(idx_BS))
    _assert_per_token(counts, flops.nominal(model.cfg, SEQ).inference_flops_per_token)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_realized_is_what_the_routing_that_happened_costs(mechanism):
    model = small_model(mechanism)
    idx_BS, targets_BS = _batch()
    result = {}
    counts = counted(lambda: result.setdefault("out", _train_step(model, idx_BS, targets_BS)))
    out = result["out"]
    if mechanism != "always":  # some slots routed, not all: the realized count is not the nominal one
        assert all(0 < share < 1 for share in _routed_share(out)), _routed_share(out)
    _assert_per_token(counts, flops.realized(model.cfg, out.stats, SEQ).flops_per_token)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_knowledge_off_pass_pays_for_no_router(mechanism):
    model = small_model(mechanism)
    idx_BS, targets_BS = _batch()
    counts = counted(lambda: _train_step(model, idx_BS, targets_BS, knowledge_off=True))
    assert "pure_reasoner.torch_knowledge_mlp" not in counts
    _assert_per_token(counts, flops.knowledge_off(model.cfg, SEQ).flops_per_token)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_knowledge_mean_pass_runs_router_and_experts_forward_only(mechanism):
    """The forget pass with ``recall_mean``: the loss reads only the logits (no aux loss), as in training."""
    model = small_model(mechanism)
    idx_BS, targets_BS = _batch()
    mask_BS = torch.rand(BATCH, SEQ) < 0.3
    result = {}

    def forget_pass():
        with knowledge_mean(model, mask_BS):
            out = result.setdefault("out", model(idx_BS))
        F.cross_entropy(out.logits_BSV.flatten(0, 1), targets_BS.flatten()).backward()

    counts = counted(forget_pass)
    assert "pure_reasoner.torch_knowledge_mlp_bwd" not in counts
    assert all(share > 0 for share in _routed_share(result["out"]))
    _assert_per_token(counts, flops.knowledge_mean(model.cfg, SEQ, result["out"].stats).flops_per_token)

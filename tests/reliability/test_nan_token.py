"""A NaN in one token, in training mode: where it may go, and what stops it.

- The MoE layer alone: a NaN token's own output may be anything; every other token's output is unchanged.
- The LM: "its own token" is its own sequence. Causal attention carries the NaN forward in time, and PyTorch's
  attention kernels (CPU flash and math alike) carry it backward too: a masked-out position gets probability
  0, and 0 x NaN in probabilities @ values is NaN, so every position of the sequence is poisoned. Every other
  sequence of the batch is unchanged.
- Training: those later positions' loss is NaN, so the step's loss is NaN, and the guard
  (``train.on_nonfinite=abort``) stops the run before that step is checkpointed. Weight gradients are not what
  protects the model: a NaN row poisons every weight gradient it meets (NaN x 0 is NaN).
"""

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, MoEConfig, PureReasonerLM, PureReasonerMoE
from pure_reasoner.moe import model as moe_model
from pure_reasoner.train.loop import TrainingAborted
from tests.train.helpers import run_in_process

MECHANISMS = ["gate", "null", "always"]


def _knowledge(mechanism: str) -> KnowledgeConfig:
    rate = 1.0 if mechanism == "always" else 0.25
    return KnowledgeConfig(num_experts=6, expert_width=40, top_k=2, mechanism=mechanism, num_null_experts=6,
                           consult_rate=rate)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_layer_nan_token_leaves_every_other_token_unchanged(mechanism):
    layer = PureReasonerMoE(MoEConfig(d_model=32, reasoning_width=48, knowledge=_knowledge(mechanism))).train()
    layer.init_weights(std=0.3, out_std=0.3)
    x_TD = torch.randn(24, 32)
    with torch.no_grad():
        clean_TD, _ = layer(x_TD)
        for t in range(x_TD.shape[0]):  # every position: whether it would have consulted or not
            poisoned_TD = x_TD.clone()
            poisoned_TD[t, 3] = float("nan")
            y_TD, _ = layer(poisoned_TD)
            others = torch.arange(x_TD.shape[0]) != t
            # fp32 rounding only: when the NaN token's routing changes, the grouped GEMM sees other row counts
            # per expert and may block its sums differently (about 1e-7 of the outputs' scale); a leak is a NaN
            # or a changed routing decision, orders of magnitude above this tolerance.
            torch.testing.assert_close(y_TD[others], clean_TD[others], rtol=1e-6, atol=1e-5, msg=f"NaN at {t}")


def _lm(mechanism: str) -> PureReasonerLM:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, reasoning_width=48,
                      knowledge=_knowledge(mechanism))
    return PureReasonerLM(cfg).train()


def _nan_at(model: PureReasonerLM, b: int, t: int):
    """A forward hook making token (b, t)'s embedding NaN: the model's first hidden state for that token."""

    def hook(module, args, out_BSD):
        out_BSD = out_BSD.clone()
        out_BSD[b, t] = float("nan")
        return out_BSD

    return model.embed.register_forward_hook(hook)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_lm_nan_token_stays_in_its_sequence(mechanism):
    model = _lm(mechanism)
    idx_BS = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        clean_BSV = model(idx_BS).logits_BSV
        handle = _nan_at(model, b=1, t=6)
        logits_BSV = model(idx_BS).logits_BSV
        handle.remove()
    assert logits_BSV[1, 6:].isnan().all()  # its sequence from t on; before t too (0 x NaN, see above)
    torch.testing.assert_close(logits_BSV[[0, 2]], clean_BSV[[0, 2]], rtol=1e-6, atol=1e-6)


def test_nan_token_in_training_is_caught_by_the_guard(tmp_path, monkeypatch, dist_info):
    """One token of one micro-batch (step 6, after the checkpoint of step 4) NaN: the run aborts before that
    update and the last checkpoint stays the good one."""
    real, calls = moe_model.PureReasonerLM.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) != 7:
            return real(self, *args, **kwargs)
        handle = _nan_at(self, b=0, t=5)
        try:
            return real(self, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(moe_model.PureReasonerLM, "forward", forward)
    with pytest.raises(TrainingAborted, match=r"non-finite .* at step 6"):
        run_in_process(tmp_path, "train.max_steps=8")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"

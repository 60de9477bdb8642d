"""Exported checkpoints round-trip exactly; bad ones fail with a clear error."""

import json

import pytest
import torch

from pure_reasoner.moe import PureReasonerLM, preset
from pure_reasoner.moe.checkpoint import CONFIG, WEIGHTS, load_pretrained, save_pretrained


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path, tied):
    cfg = preset("tiny")
    cfg.tie_embeddings = tied
    model = PureReasonerLM(cfg)
    model.moe_layers()[0].router.margin_threshold.fill_(0.7)  # controller state travels too
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx).logits_BSV, model(idx).logits_BSV, rtol=0, atol=0)
    assert float(loaded.moe_layers()[0].router.margin_threshold) == pytest.approx(0.7)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_pretrained(tmp_path)
    save_pretrained(PureReasonerLM(preset("tiny")), tmp_path)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**cfg, "d_model": 32, "n_heads": 4}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({**cfg, "flux_capacitor": 1}))
    with pytest.raises(ValueError, match="flux_capacitor"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_pretrained(tmp_path)


def test_checkpoint_with_former_controller_buffer_names_loads(tmp_path):
    """Checkpoints that name the controller's state ``consult_cut`` / ``rate_correction`` load into
    ``margin_threshold`` / ``log_rate_offset``, through load_pretrained and load_state_dict alike."""
    from safetensors.torch import load_file, save_file

    model = PureReasonerLM(preset("tiny"))
    router = model.moe_layers()[0].router
    router.margin_threshold.fill_(0.7)
    router.log_rate_offset.fill_(-0.4)
    save_pretrained(model, tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    former = {k.replace("margin_threshold", "consult_cut").replace("log_rate_offset", "rate_correction"): v
              for k, v in state.items()}
    assert any(k.endswith("router.consult_cut") for k in former)
    save_file(former, tmp_path / WEIGHTS)
    loaded = load_pretrained(tmp_path).moe_layers()[0].router
    assert float(loaded.margin_threshold) == pytest.approx(0.7)
    assert float(loaded.log_rate_offset) == pytest.approx(-0.4)
    fresh = PureReasonerLM(preset("tiny"))
    fresh.load_state_dict(former)
    assert float(fresh.moe_layers()[0].router.log_rate_offset) == pytest.approx(-0.4)

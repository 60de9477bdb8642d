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
    model.moe_layers()[0].router.consult_cut.fill_(0.7)  # controller state travels too
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx).logits_BSV, model(idx).logits_BSV, rtol=0, atol=0)
    assert float(loaded.moe_layers()[0].router.consult_cut) == pytest.approx(0.7)
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

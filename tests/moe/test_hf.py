"""Hugging Face round trip: an export loads in stock transformers (both routes) with PureReasonerLM's logits,
generates what PureReasonerLM generates, tokenizes as train.evaluation.evaluate does, and loads back into our stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.moe.checkpoint import load_pretrained, save_pretrained

pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")
os.environ["HF_HUB_OFFLINE"] = "1"  # read when transformers is first imported, below (and by subprocesses)

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=0, atol=1e-5)  # fp32


def _model(vocab_size=256, tie=True) -> PureReasonerLM:
    """A tiny model whose knowledge path matters: about half the tokens consult, with large enough experts."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                      reasoning_width=64, tie_embeddings=tie, qk_norm=True,
                      knowledge=KnowledgeConfig(num_experts=4, expert_width=32, top_k=2, consult_rate=0.5,
                                                reference_tokens=64))
    model = PureReasonerLM(cfg).eval()
    for layer in model.moe_layers():
        layer.init_weights(std=0.3, out_std=0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[PureReasonerLM, Path]:
    model = _model(vocab_size=300, tie=False)
    return model, save_pretrained(model, tmp_path_factory.mktemp("hf") / "export", hf=True)


def _ids(vocab_size: int, batch=3, seq=29, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_knowledge_path_is_exercised(exported):
    """The comparisons below would pass with a dead knowledge path; make sure it is not."""
    model, _ = exported
    out = model(_ids(300))
    rates = [float(s.consult_rate) for s in out.stats]
    assert all(0.1 < r < 0.9 for r in rates), rates
    assert (model(_ids(300), knowledge_off=True).logits_BSV - out.logits_BSV).abs().max() > 1e-3


def test_registered_route_logits_and_knowledge_off(exported):
    from transformers import AutoConfig, AutoModelForCausalLM

    import pure_reasoner.moe.hf  # noqa: F401  registers the auto classes

    model, path = exported
    config = AutoConfig.from_pretrained(path)
    assert type(config).__name__ == "PureReasonerConfig" and config.hidden_size == 32
    assert config.max_position_embeddings == 48 and config.knowledge_off is False
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and hf.dtype == torch.float32
    ids = _ids(300)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits_BSV, **TOL)
        off = AutoModelForCausalLM.from_pretrained(path, knowledge_off=True)  # the switch through the config
        assert off.config.knowledge_off is True
        torch.testing.assert_close(off(ids).logits, model(ids, knowledge_off=True).logits_BSV, **TOL)
        torch.testing.assert_close(hf(ids, knowledge_off=True).logits, off(ids).logits, **TOL)


def test_remote_code_route_in_a_fresh_process(exported, tmp_path):
    """Stock transformers with trust_remote_code=True, nothing of ours imported first: the folder's modeling file
    brings the class in."""
    model, path = exported
    ids = _ids(300)
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'pure_reasoner.moe' not in sys.modules\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(type(m).__module__, type(m).__name__)\n"
    )
    # As a user's process: the installed package only (no repository folders on the path, run elsewhere).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PureReasonerForCausalLM" in done.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits_BSV, **TOL)


def test_generate_matches_ours(exported):
    from transformers import AutoModelForCausalLM

    import pure_reasoner.moe.hf  # noqa: F401

    model, path = exported
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = _ids(300, batch=2, seq=7)
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert out.shape == (2, 13)
    assert torch.equal(out, model.generate(prompt, 6, greedy=True))


def test_labels_loss_and_padding(exported):
    from transformers import AutoModelForCausalLM

    import pure_reasoner.moe.hf  # noqa: F401

    model, path = exported
    hf = AutoModelForCausalLM.from_pretrained(path)
    ids = _ids(300)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = hf(ids, labels=labels)
        ours = model(ids)
        # transformers' convention, written out: position s predicts labels[s + 1]
        ce = F.cross_entropy(ours.logits_BSV[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        torch.testing.assert_close(out.loss, ce + ours.aux_loss, **TOL)
        right = torch.ones_like(ids)
        right[1, 20:] = 0  # right padding: logits at real positions do not depend on it
        torch.testing.assert_close(hf(ids, attention_mask=right).logits, ours.logits_BSV, **TOL)
    left = torch.ones_like(ids)
    left[1, :3] = 0
    with pytest.raises(ValueError, match="left padding"):
        hf(ids, attention_mask=left)
    with pytest.raises(ValueError, match="moe.interventions.reasoning_off"):
        hf(ids, reasoning_off=True)


def test_tokenizer_encodes_as_train_eval(tmp_path):
    """AutoTokenizer on an export equals train.evaluation.evaluate's Codec: byte ids without a tokenizer file; a
    trained BPE with its end-of-document token as eos and pad."""
    import datasets
    from transformers import AutoTokenizer

    from pure_reasoner.train.data import EOD, save_tokenizer, train_tokenizer
    from pure_reasoner.train.evaluation.evaluate import Codec, load_codec

    text = "Ana Vora was born in Brim Ka. She works as a ¿tinsmith? 42 ünïcode\n"
    byte_dir = save_pretrained(_model(), tmp_path / "bytes", hf=True)
    tok = AutoTokenizer.from_pretrained(byte_dir)
    assert tok(text, add_special_tokens=False).input_ids == Codec().encode(text) == list(text.encode())
    assert tok.decode(Codec().encode(text)) == text and tok.pad_token_id == tok.bos_token_id == tok.eos_token_id == 0

    bpe_dir = tmp_path / "bpe"
    bpe_dir.mkdir()
    docs = datasets.Dataset.from_dict({"text": [text * 3, "Brim Ka is a town. " * 20]})
    save_tokenizer(train_tokenizer(docs, "bpe", 300), bpe_dir / "tokenizer.json")
    save_pretrained(_model(vocab_size=300), bpe_dir, hf=True)
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    codec = load_codec(bpe_dir, 300)
    assert tok(text, add_special_tokens=False).input_ids == codec.encode(text)
    assert len(codec.encode(text)) < len(text.encode())  # merges were learned: not the byte case again
    assert tok.eos_token == tok.pad_token == EOD and tok.eos_token_id == codec.tokenizer.token_to_id(EOD)
    assert json.loads((bpe_dir / "config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_loads_back_into_our_stack(exported, tmp_path):
    """The export, and what transformers saves from it (weight names prefixed), load into PureReasonerLM."""
    from transformers import AutoModelForCausalLM

    import pure_reasoner.moe.hf  # noqa: F401

    model, path = exported
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "resaved")
    ids = _ids(300)
    for directory in (path, tmp_path / "resaved"):
        back = load_pretrained(directory).eval()
        assert back.cfg == model.cfg
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(back(ids).logits_BSV, model(ids).logits_BSV, rtol=0, atol=0)


def test_bad_config_value_raises(exported, tmp_path):
    from transformers import AutoConfig

    import pure_reasoner.moe.hf  # noqa: F401

    _, path = exported
    values = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, "n_heads": 5}))
    with pytest.raises(ValueError, match="model.n_heads=5 is not a multiple"):
        AutoConfig.from_pretrained(tmp_path)

"""Knowledge in context in the training pipeline: units never straddle windows, no loss on context tokens."""

import datasets
import pytest
import torch

from pure_reasoner.train import data
from pure_reasoner.train.config import WORLD_GENERATOR, DataConfig
from pure_reasoner.train.objectives import IGNORE_INDEX
from pure_reasoner.train.world.generator import corpus_world_config, world_config


def _byte_tok():
    return data.train_tokenizer(datasets.Dataset.from_dict({"text": ["x"]}), "byte", 257)


def test_units_stay_in_one_window_and_context_has_no_loss():
    tok = _byte_tok()
    eod = tok.token_to_id(data.EOD)
    rows = {"text": ["plain row here", "ANSWER", "B", "tail text"], "context": ["", "ctx one ", "longer context ", ""]}
    seq_len = 16
    stream, mask = data.tokenize_in_context(datasets.Dataset.from_dict(rows), tok, seq_len)
    assert stream.shape == mask.shape
    text = tok.decode(stream.tolist(), skip_special_tokens=False)
    assert "ctx one ANSWER" in text and "longer context B" in text
    packed = data.PackedSequences(stream, seq_len, seed=0, loss_mask=mask)
    seen_units = 0
    windows = [stream[j * seq_len : j * seq_len + seq_len] for j in range(packed.num_sequences)]
    for p in range(packed.num_sequences):
        idx_BS, targets_BS = packed.batch(torch.tensor([p]))
        i = next(j for j, w in enumerate(windows) if torch.equal(w, idx_BS[0]))  # which window position p read
        decoded = tok.decode(stream[i * seq_len : i * seq_len + seq_len + 1].tolist())
        for ctx, answer in (("ctx one ", "ANSWER"), ("longer context ", "B")):
            if ctx in decoded:
                seen_units += 1
                assert ctx + answer in decoded  # the whole unit is in this window
        # targets are the next tokens except where masked, and masked exactly on context/padding tokens
        raw = stream[i * seq_len + 1 : i * seq_len + seq_len + 1]
        keep = mask[i * seq_len + 1 : i * seq_len + seq_len + 1]
        assert torch.equal(targets_BS[0], torch.where(keep, raw, torch.full_like(raw, IGNORE_INDEX)))
    assert seen_units >= 2
    # every context byte is masked, every text byte of a context row is not
    ids = stream.tolist()
    ctx_ids = tok.encode("longer context ").ids
    start = next(j for j in range(len(ids)) if ids[j : j + len(ctx_ids)] == ctx_ids)
    assert not mask[start : start + len(ctx_ids)].any()
    assert mask[start + len(ctx_ids)] and ids[start + len(ctx_ids) + 1] == eod


def test_unit_longer_than_a_window_is_rejected():
    tok = _byte_tok()
    rows = datasets.Dataset.from_dict({"text": ["y" * 10], "context": ["c" * 10]})
    with pytest.raises(ValueError, match="at least 20"):
        data.tokenize_in_context(rows, tok, seq_len=8)


def test_config_and_world_json():
    with pytest.raises(ValueError, match="in_context_fraction"):
        DataConfig(source="generator", generator="m:f", in_context_fraction=1.5)
    with pytest.raises(ValueError, match="needs source 'generator'"):
        DataConfig(source="shakespeare", in_context_fraction=0.5)
    kwargs = dict(preset="tiny", num_people=30, in_context_fraction=0.5, num_drills=3)
    assert corpus_world_config(**kwargs) == world_config("tiny", num_people=30)


def test_world_generator_rows_carry_context():
    cfg = DataConfig(source="generator", generator=WORLD_GENERATOR,
                     generator_kwargs={"preset": "tiny"}, in_context_fraction=1.0, seq_len=512)
    docs = data.load_documents(cfg)
    assert set(docs.column_names) == {"text", "context"}
    with_context = sum(bool(c) for c in docs["context"])
    assert 0.8 * len(docs) < with_context < len(docs)  # every row but the bridge-fact ("world") rows
    plain = data.load_documents(DataConfig(source="generator", generator=WORLD_GENERATOR,
                                           generator_kwargs={"preset": "tiny"}))
    assert plain.column_names == ["text"]

"""Document masking of packed sequences (PureReasonerLM.forward's doc_ids_BS, data.doc_mask): a document packed
after others is computed exactly as the same document alone at the start of a sequence."""

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.train.data import doc_ids

CFG = ModelConfig(vocab_size=60, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, reasoning_width=48,
                  knowledge=KnowledgeConfig(num_experts=4, expert_width=24, top_k=2))
EOD = 59


def test_doc_ids_end_each_document_with_its_eod():
    idx_BS = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8]])
    assert doc_ids(idx_BS, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3]]


@pytest.mark.parametrize("mechanism", ["gate", "null", "always"])
def test_a_packed_document_is_computed_as_if_alone(mechanism):
    torch.manual_seed(0)
    rate = 1.0 if mechanism == "always" else 0.25
    cfg = ModelConfig(**{**CFG.__dict__, "knowledge": KnowledgeConfig(num_experts=4, expert_width=24, top_k=2,
                                                                       mechanism=mechanism, consult_rate=rate)})
    model = PureReasonerLM(cfg).eval()
    first, second = torch.randint(0, EOD, (11,)), torch.randint(0, EOD, (9,))
    packed_BS = torch.cat([first, torch.tensor([EOD]), second]).unsqueeze(0)
    with torch.no_grad():
        packed = model(packed_BS, doc_ids_BS=doc_ids(packed_BS, EOD)).logits_BSV[0, 12:]
        alone = model(second.unsqueeze(0)).logits_BSV[0]
        unmasked = model(packed_BS).logits_BSV[0, 12:]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)  # RoPE: relative positions only
    assert (unmasked - alone).abs().max() > 1e-2  # without the mask the earlier document leaks in


def test_doc_ids_must_match_the_tokens():
    model = PureReasonerLM(CFG)
    with pytest.raises(ValueError, match="doc_ids_BS must have the shape"):
        model(torch.zeros(2, 8, dtype=torch.long), doc_ids_BS=torch.zeros(2, 7, dtype=torch.long))

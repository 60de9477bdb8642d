"""Slot selection for knowledge updates (train.slots): unit usage against a per-token loop over rows run one at a
time, the TF-IDF ranking and selection by hand, and gradient masks that leave every unselected entry bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM
from pure_reasoner.train.slots import mask_gradients, parameter_masks, select_slots, slot_scores, unit_usage

CFG = ModelConfig(vocab_size=60, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, reasoning_width=48,
                  knowledge=KnowledgeConfig(num_experts=4, expert_width=24, top_k=2))


def _model(mechanism: str) -> PureReasonerLM:
    torch.manual_seed(0)
    rate = 1.0 if mechanism == "always" else 0.5
    knowledge = KnowledgeConfig(num_experts=4, expert_width=24, top_k=2, mechanism=mechanism, consult_rate=rate)
    return PureReasonerLM(ModelConfig(**{**CFG.__dict__, "knowledge": knowledge})).eval()


def _usage_one_token_at_a_time(model: PureReasonerLM, rows: list[list[int]]) -> tuple[list[torch.Tensor], int]:
    """The oracle: each row alone (no padding), every routed (token, slot) pair's unit outputs summed in a loop.
    Also returns how many (token, slot) pairs were idle (no expert consulted)."""
    layers = model.moe_layers()
    out = [torch.zeros(4, 24, dtype=torch.float64) for _ in layers]
    idle = 0
    seen = []
    handles = [layer.experts.register_forward_hook(lambda m, args, _o, i=i: seen.append((i, args)))
               for i, layer in enumerate(layers)]
    try:
        for row in rows:
            with torch.no_grad():
                model(torch.tensor([row]))
    finally:
        for h in handles:
            h.remove()
    for i, (x_TD, ids_TK, gates_TK) in seen:
        experts = layers[i].experts
        for t in range(x_TD.shape[0]):
            for k in range(ids_TK.shape[1]):
                e = int(ids_TK[t, k])
                if e < 0:
                    idle += 1
                    continue
                h_F = F.silu(F.linear(x_TD[t], experts.w1_EDF[e].T)) * F.linear(x_TD[t], experts.w3_EDF[e].T)
                out[i][e] += (gates_TK[t, k] * h_F).abs().double()
    return out, idle


@pytest.mark.parametrize("mechanism", ["always", "gate"])
def test_unit_usage_matches_rows_run_alone_token_by_token(mechanism):
    model = _model(mechanism)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 2)]
    got = unit_usage(model, rows, batch_size=3)  # padded batches of 3 and 2
    want, idle = _usage_one_token_at_a_time(model, rows)
    # "always" routes every (token, slot); "gate" leaves some idle, so skipping them is exercised too
    assert (idle > 0) == (mechanism == "gate")
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert w.sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_slot_scores_and_selection_by_hand():
    update = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # p = 0.8, 0, 0, 0.2
    background = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # q = 1, 0, 0, 0; N = 4
    scores = slot_scores(update, background)
    want = torch.tensor([[0.8 * -torch.log(torch.tensor(1.25)), 0.0], [0.0, 0.2 * -torch.log(torch.tensor(0.25))]],
                        dtype=torch.float64)
    torch.testing.assert_close(scores, want)
    # The unit both corpora use heavily loses to the one only the update uses.
    assert select_slots([scores], 1)[0].tolist() == [[False, False], [False, True]]
    assert select_slots([scores], 3)[0].sum() == 3
    with pytest.raises(ValueError, match="slots per layer must be in 1..4"):
        select_slots([scores], 5)
    with pytest.raises(ValueError, match="consulted no knowledge expert"):
        slot_scores(torch.zeros(2, 2), background)
    with pytest.raises(ValueError, match="usage shapes differ"):
        slot_scores(update, torch.ones(2, 3))


def test_masked_gradients_leave_every_unselected_entry_bit_for_bit():
    model = _model("always").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = [torch.zeros(4, 24, dtype=torch.bool) for _ in model.moe_layers()]
    chosen[0][1, 3] = chosen[0][2, 7] = chosen[1][0, 0] = True
    masks = parameter_masks(model, chosen)
    assert len(masks) == 6 and len(mask_gradients(model, masks)) == 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    idx_BS = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        opt.zero_grad()
        model(idx_BS, idx_BS).loss.backward()
        opt.step()
    for name, param in model.named_parameters():
        changed = param.detach() != before[name]
        if name not in masks:
            assert not changed.any(), name
            continue
        layer = next(i for i, lay in enumerate(model.moe_layers()) if any(q is param for q in lay.parameters()))
        units_EF = chosen[layer]
        per_unit = changed.any(2) if name.endswith("w2_EFD") else changed.any(1)  # [E, F]: any entry of the unit
        assert not (per_unit & ~units_EF).any(), name  # nothing outside the chosen units moved
        assert per_unit[units_EF].all(), name  # every chosen unit moved


def test_masks_that_do_not_fit_are_refused():
    model = _model("always")
    with pytest.raises(ValueError, match="selection \\(4, 23\\) does not match"):
        parameter_masks(model, [torch.ones(4, 23, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="1 selections for 2 MoE layers"):
        parameter_masks(model, [torch.ones(4, 24, dtype=torch.bool)])
    with pytest.raises(ValueError, match="masks name no parameter"):
        mask_gradients(model, {"nope": torch.ones(1)})
    name = next(n for n, _ in model.named_parameters() if n.endswith("w1_EDF"))
    with pytest.raises(ValueError, match="does not broadcast"):
        mask_gradients(model, {name: torch.ones(4, 24, 1)})

"""Evaluation: metrics on hand-made cases, the scoring machinery against direct computation, and a smoke run
(train a tiny model on a tiny world for a few dozen steps, save it, run ``python -m pure_reasoner.train.evaluation``
on it)."""

import copy
import json
import math
import random

import pytest
import torch

from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM, knowledge_mean
from pure_reasoner.moe.checkpoint import save_pretrained
from pure_reasoner.train.evaluation import mean_reference as er
from pure_reasoner.train.evaluation import scores as em
from pure_reasoner.train.evaluation.evaluate import (
    Codec,
    consult_map,
    greedy_generate,
    knowledge_bits,
    main,
    routing_specificity,
    score_continuations,
)
from pure_reasoner.train.objectives import in_context_tokens, lm_loss, shift_targets
from pure_reasoner.train.world.generator import SPLITS, build_world, pretraining_corpus, save_world_config, world_config
from pure_reasoner.train.world.splits import reference_closed_count, reference_pairs, split_examples
from pure_reasoner.train.world.text import continuation
from tests.train.lm_eval_check import assert_lm_eval_matches_train_eval


def test_chance_adjustment():
    assert em.chance_level([4, 4, 2, 2]) == pytest.approx(0.375)
    assert em.chance_adjusted(0.25, 0.25) == 0.0
    assert em.chance_adjusted(1.0, 0.25) == 1.0
    assert em.chance_adjusted(0.625, 0.25) == pytest.approx(0.5)
    assert em.chance_adjusted(0.0, 0.5) == -1.0
    assert em.accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError, match="chance"):
        em.chance_adjusted(0.5, 1.0)


def test_wilson_and_well_above_chance():
    lo, hi = em.wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert em.well_above_chance(30, 40, 0.25)
    assert not em.well_above_chance(13, 40, 0.25)  # adjusted 0.1 < 0.25
    assert not em.well_above_chance(2, 2, 0.5)  # perfect, but two examples prove nothing
    assert em.well_above_chance(40, 40, 0.5)


def test_decoupling_score():
    score, reason = em.decoupling_score(0.8, 0.0, 0.6, 0.54, open_well_above_chance=True)
    assert score == pytest.approx(1.0 - 0.1) and reason == "ok"
    score, _ = em.decoupling_score(0.8, 0.4, 0.6, 0.3, True)  # both halve: no decoupling
    assert score == pytest.approx(0.0)
    score, reason = em.decoupling_score(0.8, 0.0, 0.1, 0.1, False)
    assert score is None and "open book" in reason
    score, reason = em.decoupling_score(-0.02, 0.0, 0.6, 0.6, True)
    assert score is None and "closed book" in reason
    assert em.relative_drop(0.5, 0.6) == pytest.approx(-0.2)


def test_faithfulness():
    out = em.faithfulness(["a", "m", "a", "x"], ["a", "a", "a", "a"], ["m", "m", "m", "m"])
    assert out["follows_context"] == 0.5 and out["follows_memory"] == 0.25 and out["neither"] == 0.25
    assert out["faithfulness"] == pytest.approx(2 / 3)
    assert em.faithfulness(["x"], ["a"], ["m"])["faithfulness"] is None


def test_scores_by_key():
    keys = ["b", "a", "b", "a", "c"]
    assert em.by_key(keys, [True, False, False, False, True], metric=em.accuracy) == {"a": 0.0, "b": 0.5, "c": 1.0}
    out = em.by_key(keys, ["m", "s", "s", "x", "s"], ["s"] * 5, ["m"] * 5, metric=em.faithfulness)
    assert list(out) == ["a", "b", "c"]
    assert out["b"]["faithfulness"] == 0.5 and out["a"]["neither"] == 0.5 and out["c"]["n"] == 1
    with pytest.raises(ValueError, match="5 keys"):
        em.by_key(keys, [True], metric=em.accuracy)


def test_knowledge_bits():
    assert em.knowledge_bits([0.0, 0.0], [4, 1024]) == pytest.approx(12.0)  # certain: all of log2|V|
    assert em.knowledge_bits([-math.log(4), -math.log(8)], [4, 8]) == pytest.approx(0.0)  # uniform: nothing
    assert em.knowledge_bits([math.log(0.5)], [4]) == pytest.approx(1.0)  # half the mass on the truth: 1 of 2 bits
    assert em.knowledge_bits([-math.log(16)], [4]) == pytest.approx(-2.0)  # worse than uniform: negative
    assert em.per_parameter(12.0, 6) == 2.0 and em.per_parameter(1.0, 0) is None
    with pytest.raises(ValueError):
        em.knowledge_bits([0.3], [4])


def test_fano_bits():
    assert em.fano_bits(1.0, 8, 10) == pytest.approx(30.0)  # every value picked: all of log2|V| per fact
    assert em.fano_bits(0.25, 4, 100) == 0.0 and em.fano_bits(0.1, 4, 100) == 0.0  # chance or below: nothing
    # a = 0.5 of 4 values: 2 - h(0.5) - 0.5 log2 3 = 1 - 0.792... bits per fact
    assert em.fano_bits(0.5, 4, 1) == pytest.approx(2 - 1 - 0.5 * math.log2(3))
    assert em.fano_bits(0.9, 4, 1) < em.fano_bits(0.95, 4, 1) < em.fano_bits(1.0, 4, 1)  # grows with accuracy
    assert em.fano_bits(0.7, 1, 5) == 0.0  # one possible value: nothing to know
    for bad in ((1.2, 4, 1), (0.5, 0, 1), (0.5, 4, -1)):
        with pytest.raises(ValueError):
            em.fano_bits(*bad)


def test_normalized_logprobs_and_bits_lower_bound():
    # the model spreads mass outside the set (formatting): restricted to the set, 1/2 and 1/4 of it are the truth
    rows = [[math.log(0.1), math.log(0.1)], [math.log(0.05), math.log(0.15), math.log(0.0001)]]
    got = em.normalized_logprobs(rows, [0, 0])
    assert got[0] == pytest.approx(math.log(0.5)) and got[1] == pytest.approx(math.log(0.05 / 0.2001))
    assert all(g >= r[0] for g, r in zip(got, rows, strict=True))  # never below the unrestricted log-probability
    with pytest.raises(ValueError):
        em.normalized_logprobs(rows, [0])
    with pytest.raises(ValueError):
        em.normalized_logprobs(rows, [0, 3])
    # per attribute: worse than uniform counts 0, one bit per attribute pays for the choice of code
    assert em.bits_lower_bound([10.0, -50.0, 0.5]) == pytest.approx(9.0)
    assert em.bits_lower_bound([]) == 0.0


def test_routing_specificity_metric():
    out = em.routing_specificity(6, 10, 20, 200)
    assert out["answer_rate"] == 0.6 and out["other_rate"] == 0.1 and out["ratio"] == pytest.approx(6.0)
    assert em.routing_specificity(1, 10, 0, 50)["ratio"] is None
    # 10 answer positions (6 consult), 40 names (36 consult), 160 others (4 consult)
    out = em.routing_specificity(6, 10, 4, 160, 36, 40)
    assert out["other_rate"] == pytest.approx(40 / 200) and out["other_tokens"] == 200
    assert out["key_rate"] == pytest.approx(0.9) and out["rest_rate"] == pytest.approx(0.025)
    assert out["ratio"] == pytest.approx(3.0) and out["ratio_beyond_keys"] == pytest.approx(24.0)
    assert em.routing_specificity(6, 10, 4, 160)["key_rate"] is None


def test_routing_specificity_splits_names_from_the_rest():
    """Byte tokens: position i is character i, so each group's positions are found from the text directly and the
    consult map gives the expected counts."""
    model, codec = _tiny_model(max_seq_len=64), Codec()
    examples = [{"prompt": "Q: Where did Ana Vel study?\nA:", "answer": "Brim", "spans": [
                    {"start": 13, "end": 20, "type": "name"}, {"start": 31, "end": 35, "type": "answer"}]},
                {"prompt": "Q: Who was born earlier, Bo Ka or Li Mu?\nA:", "answer": "Bo Ka", "spans": [
                    {"start": 25, "end": 30, "type": "name"}, {"start": 34, "end": 39, "type": "name"}]},
                {"prompt": "x" * 80 + " Zed Q?\nA:", "answer": "Yo", "spans": [  # cut to fit: the name survives
                    {"start": 81, "end": 84, "type": "name"}]}]
    got = routing_specificity(model, codec, examples, batch_size=2)
    want = {"answer": [0.0, 0], "key": [0.0, 0], "rest": [0.0, 0]}
    for ex in examples:
        text = ex["prompt"] + " " + ex["answer"] + "."
        text = text[-(model.cfg.max_seq_len + 1):][:-1]  # the model's input: the last 65 characters, less the last
        cut = len(ex["prompt"] + " " + ex["answer"] + ".") - (model.cfg.max_seq_len + 1)
        consulted_S = consult_map(model, torch.tensor([list(text.encode())])).float().mean(0)[0]
        answer_at = len(ex["prompt"]) - max(cut, 0) - 1  # the prompt's last character predicts the first answer byte
        answer = set(range(answer_at, answer_at + len(" " + ex["answer"])))
        names = {ex["prompt"].index(n) - max(cut, 0) + j for n in [ex["prompt"][sp["start"]:sp["end"]]
                 for sp in ex["spans"] if sp["type"] == "name"] for j in range(len(n))}
        for i in range(len(text)):
            group = "answer" if i in answer else "key" if i in names else "rest"
            want[group][0] += float(consulted_S[i])
            want[group][1] += 1
    for group in want:
        assert got[f"{group}_tokens"] == want[group][1] > 0
        assert got[f"{group}_rate"] == pytest.approx(want[group][0] / want[group][1], abs=1e-6)
    assert got["other_tokens"] == want["key"][1] + want["rest"][1]


def _tiny_model(max_seq_len=64, mechanism="gate", vocab_size=256):
    rate = 1.0 if mechanism == "always" else 0.5
    return PureReasonerLM(ModelConfig(
        vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len, reasoning_width=64,
        knowledge=KnowledgeConfig(num_experts=4, expert_width=32, top_k=2, mechanism=mechanism, consult_rate=rate),
    )).eval()


def test_scoring_matches_direct_computation():
    model, codec = _tiny_model(), Codec()
    pairs = [("Q: Where?\nA:", " Vora."), ("x" * 70, " Brim Ka."), ("Hello", " world.")]  # the 2nd is truncated
    logprobs, greedy, truncated = score_continuations(model, codec, pairs, batch_size=2)
    assert truncated == 1
    for (context, cont), got in zip(pairs, logprobs, strict=True):
        ids = (codec.encode(context) + codec.encode(cont))[-65:]
        n = len(codec.encode(cont))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits_BSV[0], -1)
        want = sum(float(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]]) for j in range(n))
        assert got == pytest.approx(want, abs=1e-4)
    assert greedy == [False, False, False]  # an untrained model does not predict these
    prompts = ["Q: Where?\nA:", "abc", "x" * 70]
    outs = greedy_generate(model, codec, prompts, 5, stop=(), batch_size=3)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = model.generate(torch.tensor([codec.encode(prompt)[-64:]]), 5, greedy=True)[0, -5:]
        assert out == codec.decode(ref.tolist())


def test_tokenizer_json_codec(tmp_path):
    """A checkpoint with a byte-level BPE ``tokenizer.json`` is scored and decoded through it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pure_reasoner.train.evaluation.evaluate import load

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(pretraining_corpus(preset="tiny")["text"]), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    save_pretrained(_tiny_model(), tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="300 tokens"):
        load(tmp_path)
    model = _tiny_model(vocab_size=320)
    save_pretrained(model, tmp_path)
    loaded, codec = load(tmp_path)
    assert codec.name == "tokenizer.json"
    text = "Q: Where was Thom Fibiabou born?\nA: Drodath."
    assert codec.decode(codec.encode(text)) == text and len(codec.encode(text)) < len(text)
    ids, offsets = codec.encode_offsets(text)
    assert ids == codec.encode(text) and [text[a:b] for a, b in offsets] == [codec.decode([i]) for i in ids]
    assert Codec().encode_offsets("añb") == (list("añb".encode()), [(0, 1), (1, 2), (1, 2), (2, 3)])
    (logprob,), _, _ = score_continuations(loaded, codec, [("Q: Where?\nA:", " Drodath.")])
    ids = codec.encode("Q: Where?\nA:") + codec.encode(" Drodath.")
    n = len(codec.encode(" Drodath."))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits_BSV[0], -1)
    assert logprob == pytest.approx(sum(float(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]]) for j in range(n)),
                                    abs=1e-4)


def test_consult_map_matches_stats():
    model = _tiny_model()
    idx = torch.randint(0, 256, (3, 20))
    consulted_LBS = consult_map(model, idx)
    stats = model(idx).stats
    assert consulted_LBS.shape == (2, 3, 20)
    assert consulted_LBS.flatten(1).sum(1).tolist() == [int(s.consulting_tokens) for s in stats]
    assert consult_map(_tiny_model(mechanism="always"), idx).all()


def _train_tiny(world, steps=40, seq=128, batch=8):
    """A plain torch loop on the tiny world's corpus (byte tokens, contexts loss-masked)."""
    torch.manual_seed(0)
    model = _tiny_model(max_seq_len=384).train()
    ids, mask = [], []
    for row in pretraining_corpus(world, in_context_fraction=0.25):
        row_ids, row_mask = in_context_tokens(list(row["context"].encode()), list((row["text"] + "\n").encode()))
        ids += row_ids
        mask += row_mask
    ids_N, mask_N = torch.tensor(ids), torch.tensor(mask)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, losses = random.Random(0), []
    for _ in range(steps):
        starts = [rng.randrange(len(ids) - seq - 1) for _ in range(batch)]
        inputs, targets = shift_targets(torch.stack([ids_N[s : s + seq + 1] for s in starts]),
                                        torch.stack([mask_N[s : s + seq + 1] for s in starts]))
        out = model(inputs, targets)
        loss = lm_loss(out.logits_BSV, targets) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_controllers(out.stats)
        losses.append(float(loss.detach()))
    return model.eval(), losses


def test_smoke_train_then_eval(tmp_path):
    cfg = world_config("tiny", seed=1, num_distractors=0, eval_examples=6)
    world = build_world(cfg)
    model, losses = _train_tiny(world)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # bytes: from ~5.5 nats to well below
    save_pretrained(model, tmp_path / "ckpt")
    save_world_config(cfg, tmp_path / "ckpt")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--json", str(tmp_path / "r.json"), "--bits-people", "8",
                 "--max-examples", "4"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokenizer"] == "bytes" and report["world"]["seed"] == 1
    assert set(report["splits"]) == set(SPLITS)
    for split, by_ablation in report["splits"].items():
        assert set(by_ablation) == {"base", "knowledge_off", "reasoning_off"}
        for ablation, r in by_ablation.items():
            assert r["n"] == 4 and r["chance"] == (0.5 if split == "comparison" else 0.25)
            assert 0 <= r["acc"] <= 1 and r["truncated"] == 0
            # Generation runs for the base model only by default (--generate).
            assert (0 <= r["exact_match"] <= 1) if ablation == "base" else r["exact_match"] is None
            assert r["acc_adjusted"] == pytest.approx((r["acc"] - r["chance"]) / (1 - r["chance"]))
            assert r["acc_interval"][0] <= r["acc"] <= r["acc_interval"][1]
            cells = r["by_attribute"]
            assert sum(c["n"] for c in cells.values()) == 4
            assert sum(c["n"] * c["acc"] for c in cells.values()) == pytest.approx(4 * r["acc"])
    assert [(d["closed"], d["open"]) for d in report["decoupling"]] == [
        ("closed_book", "open_book"), ("closed_book_two_hop", "open_book_two_hop")]
    for d in report["decoupling"]:
        assert (d["score"] is None) == (d["reason"] != "ok")
    assert report["faithfulness"]["knowledge_off"]["generation"] is None
    assert report["faithfulness"]["base"]["generation"]["n"] == 4
    faith = report["faithfulness"]["base"]["choice"]
    assert faith["n"] == 4 and faith["follows_context"] + faith["follows_memory"] + faith["neither"] == pytest.approx(1)
    asked = [ex["attribute"] for ex in split_examples(world, "counterfactual")[:4]]
    assert {a: c["n"] for a, c in faith["by_attribute"].items()} == {a: asked.count(a) for a in set(asked)}
    assert sum(c["n"] * c["follows_context"] for c in faith["by_attribute"].values()) == pytest.approx(
        4 * faith["follows_context"])
    bits = report["knowledge_bits"]
    assert bits["people_scored"] == 8 and 0 <= bits["bits"] <= bits["max_bits"]
    assert bits["bits"] == pytest.approx(em.bits_lower_bound([a["bits"] for a in bits["per_attribute"].values()]))
    assert [a["normalized"] for a in bits["per_attribute"].values()] == [False, True, True, True, True]
    assert bits["knowledge_expert_params"] == 2 * 4 * 3 * 32 * 32
    assert bits["bits_per_knowledge_param"] == pytest.approx(bits["bits"] / bits["knowledge_expert_params"])
    listed = [a for a in bits["per_attribute"].values() if a["normalized"]]
    assert bits["fano_bits"] == pytest.approx(sum(a["fano_bits"] for a in listed))
    assert all(0 <= a["accuracy"] <= 1 and 0 <= a["fano_bits"] <= a["max_bits"] for a in listed)
    off = report["knowledge_bits_knowledge_off"]
    assert off["ablation"] == "knowledge_off" and bits["ablation"] == "base" and off["people_scored"] == 8
    for group in ("closed_book", "open_book"):
        r = report["routing"][group]
        assert 0 <= r["answer_rate"] <= 1 and 0 <= r["other_rate"] <= 1 and len(r["per_layer"]) == 2
        assert r["answer_tokens"] > 0 and r["other_tokens"] > r["answer_tokens"]


def test_knowledge_bits_under_the_mean_ablation():
    """Bits with every consulting token's knowledge output replaced by a mean: zero means must give exactly what the
    model's own knowledge-off switch gives (another code path), the recorded means something else."""
    torch.manual_seed(0)
    model, codec, world = _tiny_model(), Codec(), build_world(world_config("tiny", seed=2))
    recorded = er.reference_means(model, codec, world, count=8)
    zero = recorded._replace(knowledge_LD=torch.zeros_like(recorded.knowledge_LD))
    bits = {name: knowledge_bits(model, codec, world, 6, ablation=ablation, reference=reference)["raw_bits"]
            for name, ablation, reference in (("base", "base", None), ("off", "knowledge_off", None),
                                              ("zero", "knowledge_mean", zero),
                                              ("mean", "knowledge_mean", recorded))}
    assert bits["zero"] == pytest.approx(bits["off"], abs=1e-6)
    assert abs(bits["mean"] - bits["off"]) > 1e-3 and abs(bits["base"] - bits["off"]) > 1e-3


def test_cli_rejects_bad_input(tmp_path, capsys):
    save_pretrained(_tiny_model(), tmp_path)
    assert main(["--checkpoint", str(tmp_path)]) == 2  # no world.json
    assert "world" in capsys.readouterr().err
    save_world_config(world_config("tiny"), tmp_path)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--splits", "closed_book,telepathy"])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--ablations", "base", "--generate", "knowledge_off"])
    assert main(["--checkpoint", str(tmp_path / "missing"), "--world", str(tmp_path / "world.json")]) == 2


def test_lm_eval_harness_matches_train_eval(tmp_path):
    """``lm_eval`` (offline, our tasks and model class) scores exactly what train.evaluation.evaluate scores."""
    pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install '.[eval]')")
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = world_config("tiny", seed=2, num_distractors=0, eval_examples=3)
    model = _tiny_model(max_seq_len=512)
    save_pretrained(model, tmp_path / "ckpt")
    save_world_config(cfg, tmp_path / "ckpt")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root),
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "pure_reasoner.train.evaluation.lm_eval_model", "--model", "pure_reasoner",
           "--model_args", f"checkpoint={tmp_path / 'ckpt'}", "--device", "cpu", "--batch_size", "8", "--log_samples",
           "--tasks", "pr_counterfactual,pr_open_book_gen",
           "--include_path", str(root / "train/evaluation/lm_eval_tasks"),
           "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_lm_eval_matches_train_eval(model, Codec(), build_world(cfg), tmp_path / "out")


def _knowledge_model(max_seq_len=512):
    """A tiny model whose knowledge path is large enough to matter, with moderate logits."""
    model = _tiny_model(max_seq_len=max_seq_len)
    for layer in model.moe_layers():
        layer.init_weights(std=0.3, out_std=0.05)
    return model


def test_knowledge_mean_ablation_is_asked_for_by_name(tmp_path):
    """Not in the default ablations (baseline FFNs lack it); by name it scores, moves the scores, and the report
    stores its reference: described in the JSON, its tensors next to it; --mean-reference reapplies them."""
    model = _knowledge_model(max_seq_len=256)
    codec, world = Codec(), build_world(world_config("tiny", eval_examples=6))
    pairs = [("Ada Lovelace was born in", " Oslo"), ("Q: Where was Bo born?\nA:", " Rome")]
    reference = er.reference_means(model, codec, world)
    base, _, _ = score_continuations(model, codec, pairs, ablation="base")
    mean, _, _ = score_continuations(model, codec, pairs, ablation="knowledge_mean", reference=reference)
    assert base != mean
    with pytest.raises(ValueError, match="needs the reference means"):
        score_continuations(model, codec, pairs, ablation="knowledge_mean")
    save_pretrained(model, tmp_path / "ckpt")
    save_world_config(world.cfg, tmp_path / "ckpt")
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--bits-people", "0", "--max-examples", "4", "--splits",
            "closed_book", "--ablations", "base,knowledge_mean,answer_mean"]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["splits"]["closed_book"]) == {"base", "knowledge_mean", "answer_mean"}
    stored = er.load_reference(tmp_path / "r.means.safetensors")
    torch.testing.assert_close(stored.knowledge_LD, reference.knowledge_LD, rtol=0, atol=1e-6)
    torch.testing.assert_close(stored.answer_LD, reference.answer_LD, rtol=0, atol=1e-6)
    described = report["mean_reference"]
    assert described["sha256"] == er.describe(stored)["sha256"] and described["sequences"] == 256
    assert described["knowledge_norm"] == pytest.approx(stored.knowledge_LD.norm(dim=1).tolist())
    # a stored reference, reapplied, gives the same report
    assert main([*args, "--json", str(tmp_path / "again.json"), "--mean-reference",
                 str(tmp_path / "r.means.safetensors")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["splits"] == report["splits"]
    (tmp_path / "bad.means.safetensors").write_text("not tensors")
    assert main([*args, "--mean-reference", str(tmp_path / "bad.means.safetensors")]) == 2
    with pytest.raises(ValueError, match="knowledge_mean's mask_BS must be None or a bool tensor"):
        with knowledge_mean(model, "answer positions"):
            pass
    with pytest.raises(SystemExit):  # answer_mean scores given continuations; it cannot generate
        main(["--checkpoint", str(tmp_path / "ckpt"), "--ablations", "answer_mean", "--generate", "answer_mean"])


def test_lm_eval_mean_ablation_uses_a_stored_reference(tmp_path):
    """The lm_eval model takes the mean ablations' constants from a stored file (mean_reference=FILE) and scores
    what train.evaluation.evaluate scores with them; without the file it refuses."""
    pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install '.[eval]')")
    from pure_reasoner.train.evaluation.lm_eval_model import PureReasonerEvalLM

    model, codec = _knowledge_model(max_seq_len=256), Codec()
    save_pretrained(model, tmp_path / "ckpt")
    reference = er.reference_means(model, codec, build_world(world_config("tiny")), count=16)
    er.save_reference(reference, tmp_path / "r.means.safetensors")
    with pytest.raises(ValueError, match="needs model_args mean_reference=FILE"):
        PureReasonerEvalLM(checkpoint=str(tmp_path / "ckpt"), ablation="answer_mean")
    lm = PureReasonerEvalLM(checkpoint=str(tmp_path / "ckpt"), ablation="answer_mean",
                            mean_reference=str(tmp_path / "r.means.safetensors"))
    pairs = [("Q: Where was Bo born?\nA:", " Rome."), ("Cy works at", " X.")]
    requests = [type("Request", (), {"args": pair})() for pair in pairs]
    expected, _, _ = score_continuations(model, codec, pairs, ablation="answer_mean", reference=reference)
    base, _, _ = score_continuations(model, codec, pairs)
    assert min(abs(e - b) for e, b in zip(expected, base, strict=True)) > 1e-3  # the file is what changes them
    assert [logprob for logprob, _ in lm.loglikelihood(requests)] == pytest.approx(expected, abs=1e-6)


def _patched_experts(model, means_LD, mask_T):
    """The model with each layer's experts computed by the loop oracle, the consulting tokens in ``mask_T``
    (all, when None) given means_LD[layer]: an implementation of the mean ablation independent of the hooks."""
    from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference

    def forward(layer, experts):
        def run(x_TD, ids_TK, gates_TK):
            out_TD = knowledge_mlp_reference(x_TD, ids_TK, gates_TK, experts.w1_EDF, experts.w3_EDF, experts.w2_EFD)
            replaced_T = (ids_TK >= 0).any(1) & (True if mask_T is None else mask_T)
            return torch.where(replaced_T.unsqueeze(1), means_LD[layer], out_TD)

        return run

    for i, layer in enumerate(model.moe_layers()):
        layer.experts.forward = forward(i, layer.experts)
    return model


@pytest.mark.parametrize("ablation", ["knowledge_mean", "answer_mean"])
def test_mean_ablations_apply_the_constant_where_they_should(ablation):
    """Each pair scored alone with patched experts (the oracle above; answer_mean: at the positions predicting
    its continuation) == train.evaluation.evaluate's score of the batch."""
    model, codec = _knowledge_model(max_seq_len=256), Codec()
    num_layers = len(model.moe_layers())
    reference = er.MeanReference(torch.randn(num_layers, 32), torch.randn(num_layers, 32),
                                 torch.ones(num_layers, dtype=torch.long), torch.ones(num_layers, dtype=torch.long), 1)
    pairs = [("Ada Lovelace was born in", " Oslo."), ("Q: Where was Bo born?\nA:", " Rome."), ("Cy works at", " X.")]
    got, _, _ = score_continuations(model, codec, pairs, ablation=ablation, batch_size=3, reference=reference)
    base, _, _ = score_continuations(model, codec, pairs, ablation="base", batch_size=3)
    assert min(abs(g - b) for g, b in zip(got, base, strict=True)) > 1e-3
    means_LD = reference.knowledge_LD if ablation == "knowledge_mean" else reference.answer_LD
    for (context, cont), score in zip(pairs, got, strict=True):
        c, t = codec.encode(context), codec.encode(cont)
        idx_1S = torch.tensor([[*c, *t][:-1]])
        answer_T = torch.arange(idx_1S.shape[1]) >= len(c) - 1
        oracle = _patched_experts(copy.deepcopy(model), means_LD, answer_T if ablation == "answer_mean" else None)
        with torch.no_grad():
            logp_SV = torch.log_softmax(oracle(idx_1S).logits_BSV[0].double(), -1)
        expected = sum(float(logp_SV[len(c) - 1 + k, tok]) for k, tok in enumerate(t))
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("ablation", ["base", "knowledge_off", "knowledge_mean", "answer_mean"])
def test_scores_do_not_depend_on_the_batch(ablation):
    """train.evaluation.evaluate's scores of the world's questions (closed and open book, so rows of very different
    lengths share a padded batch) at batch sizes 1, 7 and 64 agree within 1e-5; so do the reference means."""
    model, codec = _knowledge_model(), Codec()
    world = build_world(world_config("tiny"))
    examples = split_examples(world, "closed_book")[:10] + split_examples(world, "open_book")[:8]
    pairs = [(ex["prompt"], continuation(c)) for ex in examples for c in ex["choices"]]
    references = {bs: er.reference_means(model, codec, world, count=64, batch_size=bs) for bs in (1, 7, 64)}
    scores = {bs: score_continuations(model, codec, pairs, ablation=ablation, batch_size=bs,
                                      reference=references[bs])[0] for bs in (1, 7, 64)}
    for bs in (7, 64):
        torch.testing.assert_close(references[bs].knowledge_LD, references[1].knowledge_LD, rtol=0, atol=1e-6)
        torch.testing.assert_close(references[bs].answer_LD, references[1].answer_LD, rtol=0, atol=1e-6)
        assert max(abs(a - b) for a, b in zip(scores[bs], scores[1], strict=True)) <= 1e-5
    if ablation != "base":  # the ablation is not a no-op
        base, _, _ = score_continuations(model, codec, pairs, batch_size=7)
        assert max(abs(a - b) for a, b in zip(scores[7], base, strict=True)) > 0.05


def test_reference_set_holds_no_eval_example():
    """Deterministic; its closed-book questions are about QA people, never about the held-out people the
    closed-book splits ask about; no prompt of any split is in it."""
    world = build_world(world_config("tiny"))
    pairs = reference_pairs(world, 40)
    assert pairs == reference_pairs(world, 40) and len(pairs) == 40
    eval_prompts = {ex["prompt"] for split in SPLITS for ex in split_examples(world, split)}
    assert not eval_prompts & {prompt for prompt, _ in pairs}
    closed = [prompt for prompt, _ in pairs if prompt.startswith("Q: ")]
    assert len(closed) == 20
    for count in (40, 256):  # half the set, or (tiny world, 256) as many as the QA people's facts allow
        every = reference_pairs(world, count)
        questions = [pair for pair in every if pair[0].startswith("Q: ")]
        assert questions and every[:reference_closed_count(world, count)] == questions
    heldout = [p.name for p in world.heldout_people]
    assert not [q for q in closed if any(name in q for name in heldout)]
    assert all(any(p.name in q for p in world.qa_people) for q in closed)
